//! Who may call what: the server's one authorisation table ([`RPC_TABLE`]), the gate that
//! applies it to every request before a service sees it ([`Gate`]), and the per-identity
//! ledger behind the checks a role alone cannot make ([`Access`]): requester-id ownership
//! on the ATS link, links per identity, domains per identity and who owns each domain, and
//! the page-table frames those domains hold ([`frames`]).
//!
//! Identities come from the TLS acceptor ([`dmar_auth::incoming`]), which verifies the client
//! certificate against the CA and attaches a [`PeerInfo`] to every request of the
//! connection; grants come from the operator's [`Policy`]. Without TLS (insecure mode) every
//! caller is [`Identity::insecure`] with [`Policy::permissive`]: every role, every requester
//! id, and no quota or ownership is enforced, so nothing changes for local runs.
//!
//! Refusals are counted (`dmar_server_auth_refusals_total{reason}`,
//! `dmar_server_quota_refusals_total{quota}`) and logged at most once per second per
//! reason, with the number of refusals the log suppressed since.
//!
//! Not here: certificate parsing, the policy format and connection quotas (`dmar-auth`);
//! what each RPC does (the services).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dmar_auth::{AcceptConfig, Grant, Identity, PeerInfo, Policy, Role, TlsMaterial};
use dmar_vtd::ids::{DomainId, SourceId};
use metrics::{Counter, counter, describe_counter};
use parking_lot::Mutex;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// How the server authenticates its peers: part of [`super::ServerConfig`].
///
/// The default is [`Transport::Plaintext`], so library callers (tests, the embedded server
/// of the load generator) keep working; the binary refuses plaintext on a non-loopback
/// address unless told `--insecure`.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// Plaintext or mutual TLS with a policy.
    pub transport: Transport,
    /// Handshake (or, in plaintext, first-bytes) time-out and concurrent handshakes.
    pub accept: AcceptConfig,
}

/// The transport of the gRPC port.
#[derive(Clone, Debug, Default)]
pub enum Transport {
    /// No TLS: every caller is [`Identity::insecure`] holding every role.
    #[default]
    Plaintext,
    /// TLS with optional client certificates (so health answers a probe without one);
    /// every other call is authorised against `policy`.
    MutualTls {
        /// The server's certificate and key, and the CA client certificates must chain to.
        material: TlsMaterial,
        /// Who holds which roles, requester ids and quotas.
        policy: Arc<Policy>,
    },
}

impl Security {
    /// Insecure mode.
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// Mutual TLS with `material`, authorising calls against `policy`.
    pub fn mutual_tls(material: TlsMaterial, policy: Policy) -> Self {
        Self { transport: Transport::MutualTls { material, policy: Arc::new(policy) }, accept: AcceptConfig::default() }
    }

    /// True with TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.transport, Transport::MutualTls { .. })
    }
}

/// What a call needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// Anyone, with or without a certificate: health, for probes that cannot do TLS.
    Anyone,
    /// Any identity the policy names: reflection (the schema is not a secret, but an
    /// anonymous peer gets nothing but health).
    Named,
    /// A role ([`Role::permits`]: an operator passes observer checks).
    Role(Role),
}

/// The one authorisation table: every method the server serves and what calling it needs.
/// A method missing here is refused ([`need`]), so a new RPC is closed until it is listed;
/// a test checks the table against the proto.
pub(crate) const RPC_TABLE: &[(&str, Need)] = &[
    ("/dmar.v1.Control/CreateDomain", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/DestroyDomain", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/Attach", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/Detach", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/Map", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/Unmap", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/Flush", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/Translate", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/ReadRegister", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/WriteRegister", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/ReadMemory", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/WriteMemory", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/SubmitInvalidations", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/SetInterruptEntry", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/RespondPageRequest", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/ReleaseRequesterIds", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/WatchFaults", Need::Role(Role::Observer)),
    ("/dmar.v1.Control/WatchInterrupts", Need::Role(Role::Observer)),
    ("/dmar.v1.Control/WatchPageRequests", Need::Role(Role::Observer)),
    ("/dmar.v1.Control/GetStats", Need::Role(Role::Observer)),
    ("/dmar.v1.Control/GetPlatform", Need::Role(Role::Observer)),
    ("/dmar.v1.Control/ReadAcpiTable", Need::Role(Role::Observer)),
    ("/dmar.v1.Control/WatchUnitInterrupts", Need::Role(Role::Observer)),
    ("/dmar.v1.Control/ClaimUnit", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/ReleaseUnit", Need::Role(Role::Operator)),
    ("/dmar.v1.Control/ResetUnit", Need::Role(Role::Operator)),
    ("/dmar.v1.AtsLink/Open", Need::Role(Role::Device)),
    ("/grpc.health.v1.Health/Check", Need::Anyone),
    ("/grpc.health.v1.Health/Watch", Need::Anyone),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Need::Named),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Need::Named),
];

/// What calling `path` (`/package.Service/Method`) needs; `None` for a method the table
/// does not list.
pub(crate) fn need(path: &str) -> Option<Need> {
    RPC_TABLE.iter().find(|(p, _)| *p == path).map(|(_, n)| *n)
}

/// The authorised caller of a request, put in its extensions by the [`Gate`].
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub(crate) identity: Identity,
    pub(crate) grant: Arc<Grant>,
}

/// The caller of `request`, as the gate admitted it.
pub(crate) fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    // Every service but health sits behind the gate; a request without a caller means the
    // wiring is wrong, and failing closed is the only safe answer.
    request.extensions().get::<Caller>().cloned().ok_or_else(|| Status::unauthenticated("the call was not authorised"))
}

/// Why a call was refused: the bounded label set of `dmar_server_auth_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    NoCertificate,
    UnknownIdentity,
    WrongRole,
    RequesterIdRange,
    RequesterIdOwned,
    DomainOwner,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::NoCertificate,
        Refusal::UnknownIdentity,
        Refusal::WrongRole,
        Refusal::RequesterIdRange,
        Refusal::RequesterIdOwned,
        Refusal::DomainOwner,
    ];

    const fn label(self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::UnknownIdentity => "unknown_identity",
            Refusal::WrongRole => "wrong_role",
            Refusal::RequesterIdRange => "requester_id_range",
            Refusal::RequesterIdOwned => "requester_id_owned",
            Refusal::DomainOwner => "domain_owner",
        }
    }
}

/// A quota that refused a call: the label set of `dmar_server_quota_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quota {
    Links,
    Domains,
    Frames,
}

impl Quota {
    const ALL: [Quota; 3] = [Quota::Links, Quota::Domains, Quota::Frames];

    const fn label(self) -> &'static str {
        match self {
            Quota::Links => "max_links",
            Quota::Domains => "max_domains",
            Quota::Frames => "max_frames",
        }
    }
}

/// The metric names this module exports (listed in [`super::metrics::METRIC_NAMES`]).
pub(crate) const AUTH_REFUSALS: &str = "dmar_server_auth_refusals_total";
pub(crate) const QUOTA_REFUSALS: &str = "dmar_server_quota_refusals_total";

fn describe() {
    describe_counter!(AUTH_REFUSALS, "Calls refused by authentication or authorisation, by reason");
    describe_counter!(QUOTA_REFUSALS, "Calls refused because the caller reached a quota, by quota");
}

/// One label's counter and its log rate limit: at most one line per second, carrying the
/// number of refusals suppressed since the last line.
#[derive(Debug)]
struct Limited {
    counter: Counter,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

/// Log lines per label per this period, at most one.
const LOG_PERIOD: Duration = Duration::from_secs(1);

impl Limited {
    fn new(counter: Counter) -> Self {
        Self { counter, last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// Counts one refusal; logs it unless a line for this label went out within the period.
    fn record(&self, label: &'static str, identity: Option<&Identity>, status: &Status) {
        self.counter.increment(1);
        let now = Instant::now();
        {
            let mut last = self.last.lock();
            if last.is_some_and(|t| now.duration_since(t) < LOG_PERIOD) {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *last = Some(now);
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        // Identities are validated names (dmar_auth::Identity), safe in a log line.
        tracing::warn!(
            reason = label,
            identity = identity.map(Identity::as_str),
            code = ?status.code(),
            suppressed,
            "call refused: {}",
            status.message()
        );
    }
}

/// Who owns a requester id, and on how many live links it is bound now.
#[derive(Debug)]
struct Owner {
    identity: Identity,
    live: u32,
}

/// The per-identity counts, under one lock: binds and domain changes are rare.
#[derive(Debug, Default)]
struct Ledger {
    owners: HashMap<SourceId, Owner>,
    links: HashMap<Identity, u32>,
    domain_owners: HashMap<DomainId, Identity>,
    domains: HashMap<Identity, u32>,
}

/// The server's authorisation state: the policy's grants, the ledger, the refusal metrics.
#[derive(Debug)]
pub(crate) struct Access {
    /// `false` in insecure mode: every check passes and nothing is counted.
    enforcing: bool,
    grants: HashMap<Identity, Arc<Grant>>,
    insecure: Caller,
    ledger: Mutex<Ledger>,
    /// Orders domain creation and destruction with their ledger updates
    /// ([`Access::create_domain`], [`Access::destroy_domain`]). Taken on the blocking pool
    /// only, never on a runtime worker: a destroy may wait for invalidations.
    lifecycle: Mutex<()>,
    /// One lock per identity, taken by calls that charge page-table frames ([`frames`]).
    budget_locks: frames::BudgetLocks,
    refusals: [Limited; Refusal::ALL.len()],
    quotas: [Limited; Quota::ALL.len()],
}

impl Access {
    /// The state for `security`; registers the refusal metrics.
    pub(crate) fn new(security: &Security) -> Self {
        describe();
        let (enforcing, grants) = match &security.transport {
            Transport::Plaintext => (false, HashMap::new()),
            Transport::MutualTls { policy, .. } => {
                (true, policy.iter().map(|(id, g)| (id.clone(), Arc::new(g.clone()))).collect())
            }
        };
        // What Policy::permissive grants its one identity.
        let grant = Grant {
            roles: dmar_auth::Roles::ALL,
            requester_ids: dmar_auth::RequesterIdSet::all(),
            quotas: dmar_auth::Quotas::DEFAULT,
        };
        let insecure = Caller { identity: Identity::insecure(), grant: Arc::new(grant) };
        let budget_locks = grants.keys().map(|id| (id.clone(), Arc::default())).collect();
        Self {
            enforcing,
            grants,
            insecure,
            ledger: Mutex::new(Ledger::default()),
            lifecycle: Mutex::new(()),
            budget_locks,
            refusals: Refusal::ALL.map(|r| Limited::new(counter!(AUTH_REFUSALS, "reason" => r.label()))),
            quotas: Quota::ALL.map(|q| Limited::new(counter!(QUOTA_REFUSALS, "quota" => q.label()))),
        }
    }

    fn refuse(&self, why: Refusal, identity: Option<&Identity>, status: Status) -> Status {
        self.refusals[why as usize].record(why.label(), identity, &status);
        status
    }

    /// The refusal of a call past `quota`, with an optional `detail` (ours, not the
    /// client's) after the quota.
    fn over_quota(&self, quota: Quota, identity: &Identity, limit: u64, detail: &str) -> Status {
        let mut message = format!("{identity} reached its {} quota of {limit}", quota.label());
        if !detail.is_empty() {
            message = format!("{message}: {detail}");
        }
        let status = Status::resource_exhausted(message);
        self.quotas[quota as usize].record(quota.label(), Some(identity), &status);
        status
    }

    /// Decides a request for `path` from `peer`: the caller to hand the service, `None` for
    /// a call anyone may make (health), or the refusal.
    pub(crate) fn admit(&self, path: &str, peer: Option<&PeerInfo>) -> Result<Option<Caller>, Status> {
        let need = need(path);
        if need == Some(Need::Anyone) {
            return Ok(None);
        }
        if !self.enforcing {
            return Ok(Some(self.insecure.clone()));
        }
        let Some(identity) = peer.and_then(PeerInfo::identity) else {
            let status = Status::unauthenticated("a client certificate is required");
            return Err(self.refuse(Refusal::NoCertificate, None, status));
        };
        let Some(grant) = self.grants.get(identity) else {
            let status = Status::permission_denied(format!("identity {identity} is not in the server's policy"));
            return Err(self.refuse(Refusal::UnknownIdentity, Some(identity), status));
        };
        match need {
            None => Err(Status::unimplemented("no such method")),
            Some(Need::Anyone | Need::Named) => Ok(Some(Caller { identity: identity.clone(), grant: grant.clone() })),
            Some(Need::Role(role)) if grant.permits(role) => {
                Ok(Some(Caller { identity: identity.clone(), grant: grant.clone() }))
            }
            Some(Need::Role(role)) => {
                let held: Vec<&str> = grant.roles.iter().map(Role::as_str).collect();
                let status = Status::permission_denied(format!(
                    "the {role} role is required; {identity} holds {}",
                    held.join(", ")
                ));
                Err(self.refuse(Refusal::WrongRole, Some(identity), status))
            }
        }
    }

    /// Admits an ATS link of `caller` binding `sids`: each must be in the caller's ranges
    /// and not owned by another identity, and the caller must be under its `max_links`.
    /// The returned claim holds the link's place until it is dropped (when the link ends);
    /// the requester ids stay the caller's afterwards, until an operator releases them.
    pub(crate) fn claim_link(
        self: &Arc<Self>,
        caller: &Caller,
        sids: impl IntoIterator<Item = SourceId>,
    ) -> Result<LinkClaim, Status> {
        if !self.enforcing {
            return Ok(LinkClaim { access: None, identity: caller.identity.clone(), sids: Vec::new() });
        }
        let sids: Vec<SourceId> = sids.into_iter().collect();
        let id = &caller.identity;
        if let Some(sid) = sids.iter().find(|s| !caller.grant.may_bind(**s)) {
            let status =
                Status::permission_denied(format!("{id} may not bind requester id {sid}: outside its policy ranges"));
            return Err(self.refuse(Refusal::RequesterIdRange, Some(id), status));
        }
        let mut ledger = self.ledger.lock();
        let taken = sids.iter().find_map(|s| ledger.owners.get(s).filter(|o| o.identity != *id).map(|o| (s, o)));
        if let Some((sid, owner)) = taken {
            let status = Status::permission_denied(format!(
                "requester id {sid} belongs to {}; an operator can release it",
                owner.identity
            ));
            drop(ledger);
            return Err(self.refuse(Refusal::RequesterIdOwned, Some(id), status));
        }
        let max = caller.grant.quotas.max_links;
        let links = ledger.links.get(id).copied().unwrap_or(0);
        if links >= max {
            drop(ledger);
            return Err(self.over_quota(Quota::Links, id, u64::from(max), ""));
        }
        ledger.links.insert(id.clone(), links + 1);
        for sid in &sids {
            ledger.owners.entry(*sid).or_insert_with(|| Owner { identity: id.clone(), live: 0 }).live += 1;
        }
        drop(ledger);
        Ok(LinkClaim { access: Some(self.clone()), identity: id.clone(), sids })
    }

    /// Releases requester ids from their owners (every id not bound on a live link with
    /// `all`). Refuses, releasing nothing, if a listed id is bound on a live link.
    pub(crate) fn release(&self, sids: &[SourceId], all: bool) -> Result<u32, Status> {
        let mut ledger = self.ledger.lock();
        if all {
            let before = ledger.owners.len();
            ledger.owners.retain(|_, o| o.live > 0);
            return Ok((before - ledger.owners.len()) as u32);
        }
        if let Some((sid, owner)) =
            sids.iter().find_map(|s| ledger.owners.get(s).filter(|o| o.live > 0).map(|o| (s, o)))
        {
            return Err(Status::failed_precondition(format!(
                "requester id {sid} is bound on a live link of {}",
                owner.identity
            )));
        }
        Ok(sids.iter().filter(|s| ledger.owners.remove(s).is_some()).count() as u32)
    }

    /// Takes a domain slot for `caller` before the driver creates the domain: refused at
    /// `max_domains`. Commit it with the new id; dropping it uncommitted gives it back.
    pub(crate) fn reserve_domain(self: &Arc<Self>, caller: &Caller) -> Result<DomainSlot, Status> {
        if !self.enforcing {
            return Ok(DomainSlot { access: None, identity: caller.identity.clone() });
        }
        let id = &caller.identity;
        let max = caller.grant.quotas.max_domains;
        let mut ledger = self.ledger.lock();
        let held = ledger.domains.get(id).copied().unwrap_or(0);
        if held >= max {
            drop(ledger);
            return Err(self.over_quota(Quota::Domains, id, u64::from(max), ""));
        }
        ledger.domains.insert(id.clone(), held + 1);
        Ok(DomainSlot { access: Some(self.clone()), identity: id.clone() })
    }

    /// Refuses `caller` destroying a domain another identity created.
    pub(crate) fn check_domain_owner(&self, caller: &Caller, did: DomainId) -> Result<(), Status> {
        if !self.enforcing {
            return Ok(());
        }
        let owner = self.ledger.lock().domain_owners.get(&did).cloned();
        match owner {
            Some(owner) if owner != caller.identity => {
                let status = Status::permission_denied(format!("domain {did} belongs to {owner}"));
                Err(self.refuse(Refusal::DomainOwner, Some(&caller.identity), status))
            }
            _ => Ok(()),
        }
    }

    /// Creates a domain with `create` and records `slot`'s identity as its owner in one
    /// step. Runs on the blocking pool, to completion even if the caller goes away, so a
    /// domain the driver created always has its owner; and in one order with
    /// [`Access::destroy_domain`], because the driver gives a freed id to the next domain:
    /// a destroy's ledger update must not land on the domain that reused its id.
    pub(crate) fn create_domain(
        &self,
        slot: DomainSlot,
        create: impl FnOnce() -> Result<DomainId, Status>,
    ) -> Result<DomainId, Status> {
        let _order = self.lifecycle.lock();
        let did = create()?;
        slot.commit(did);
        Ok(did)
    }

    /// Destroys `did` with `destroy` and forgets its owner in one step (see
    /// [`Access::create_domain`]). Runs on the blocking pool.
    pub(crate) fn destroy_domain(
        &self,
        did: DomainId,
        destroy: impl FnOnce() -> Result<(), Status>,
    ) -> Result<(), Status> {
        let _order = self.lifecycle.lock();
        destroy()?;
        self.domain_destroyed(did);
        Ok(())
    }

    /// Forgets `did` after the driver destroyed it, giving its owner's slot back.
    fn domain_destroyed(&self, did: DomainId) {
        if !self.enforcing {
            return;
        }
        let mut ledger = self.ledger.lock();
        if let Some(owner) = ledger.domain_owners.remove(&did) {
            decrement(&mut ledger.domains, &owner);
        }
    }
}

fn decrement(counts: &mut HashMap<Identity, u32>, id: &Identity) {
    if let Some(n) = counts.get_mut(id) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(id);
        }
    }
}

/// A live link's place in its identity's `max_links` and its requester ids' live counts.
#[derive(Debug)]
pub(crate) struct LinkClaim {
    access: Option<Arc<Access>>,
    identity: Identity,
    sids: Vec<SourceId>,
}

impl Drop for LinkClaim {
    fn drop(&mut self) {
        let Some(access) = &self.access else { return };
        let mut ledger = access.ledger.lock();
        decrement(&mut ledger.links, &self.identity);
        for sid in &self.sids {
            // Ownership is sticky: the entry stays, only its live count drops.
            if let Some(owner) = ledger.owners.get_mut(sid) {
                owner.live = owner.live.saturating_sub(1);
            }
        }
    }
}

/// A reserved place in an identity's `max_domains`.
#[derive(Debug)]
pub(crate) struct DomainSlot {
    access: Option<Arc<Access>>,
    identity: Identity,
}

impl DomainSlot {
    /// The driver created `did`: record its owner and keep the slot.
    fn commit(mut self, did: DomainId) {
        if let Some(access) = self.access.take() {
            access.ledger.lock().domain_owners.insert(did, self.identity.clone());
        }
    }
}

impl Drop for DomainSlot {
    fn drop(&mut self) {
        if let Some(access) = &self.access {
            decrement(&mut access.ledger.lock().domains, &self.identity);
        }
    }
}

/// A service behind the authorisation table: refuses what [`Access::admit`] refuses and
/// hands the rest to the service with the [`Caller`] in the request's extensions.
#[derive(Clone, Debug)]
pub(crate) struct Gate<S> {
    inner: S,
    access: Arc<Access>,
}

impl<S> Gate<S> {
    pub(crate) fn new(inner: S, access: Arc<Access>) -> Self {
        Self { inner, access }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

type Responding = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Responding;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match self.access.admit(request.uri().path(), request.extensions().get::<PeerInfo>()) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

mod frames;
#[cfg(test)]
mod tests;
