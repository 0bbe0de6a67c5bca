//! The `max_frames` quota: page-table frames the domains an identity owns may hold.
//!
//! The driver counts frames per domain ([`Driver::domain_frames`]) and takes a frame limit
//! per map ([`Driver::map_within`]); this module turns an identity's quota into that limit.
//! A [`FrameBudget`] is held for one call that can make a domain grow (a `Map`, a
//! `CreateDomain` of a paging domain): it serialises those calls per identity (each takes
//! the identity's budget lock), sums what the identity's domains hold, and hands the
//! driver what is left, so concurrent calls of one identity cannot together pass its
//! quota, and one call never takes more than it needs. Calls that only give frames back
//! (unmap, destroy, deferred flushes) take no lock.
//!
//! Frames are charged to the domain's owner (the identity that created it), whoever maps:
//! an operator may map into another tenant's domain, and the frames are that tenant's.
//!
//! Not here: the per-domain count itself and the dry run that sizes a map (`dmar-vtd`).

use std::sync::Arc;

use dmar_auth::Identity;
use dmar_vtd::driver::{Driver, DriverError, Perm};
use dmar_vtd::ids::{DomainId, Hpa, Iova};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use tonic::Status;

use super::{Access, Caller, Quota};

/// The per-identity locks that serialise calls charging frames (one per policy identity,
/// made at start: the policy does not change while the server runs).
pub(super) type BudgetLocks = std::collections::HashMap<Identity, Arc<AsyncMutex<()>>>;

/// One call's share of an identity's `max_frames` quota, held until the call is done.
#[derive(Debug)]
pub(crate) struct FrameBudget {
    /// `None` in insecure mode (or for an identity without a quota): nothing is charged.
    charged: Option<Charged>,
}

#[derive(Debug)]
struct Charged {
    access: Arc<Access>,
    identity: Identity,
    max: u64,
    /// Frames the identity may still take in this call.
    left: usize,
    _turn: OwnedMutexGuard<()>,
}

impl Access {
    /// The frame budget of a call that may grow `did` (a map into it); the caller's own
    /// budget when `did` is `None` (a new domain). Waits for the owner's earlier calls that
    /// charge frames.
    pub(crate) async fn frame_budget(
        self: &Arc<Self>,
        caller: &Caller,
        did: Option<DomainId>,
        driver: &Driver,
    ) -> FrameBudget {
        if !self.enforcing {
            return FrameBudget { charged: None };
        }
        let owner = did.and_then(|d| self.ledger.lock().domain_owners.get(&d).cloned());
        let identity = owner.unwrap_or_else(|| caller.identity.clone());
        let (Some(lock), Some(grant)) = (self.budget_locks.get(&identity), self.grants.get(&identity)) else {
            // Not a policy identity (cannot happen: owners are callers the gate admitted).
            return FrameBudget { charged: None };
        };
        let turn = lock.clone().lock_owned().await;
        let domains: Vec<DomainId> =
            self.ledger.lock().domain_owners.iter().filter(|(_, o)| **o == identity).map(|(d, _)| *d).collect();
        // A domain destroyed meanwhile holds nothing.
        let held: u64 = domains.iter().map(|d| driver.domain_frames(*d).unwrap_or(0) as u64).sum();
        let max = grant.quotas.max_frames;
        let left = usize::try_from(max.saturating_sub(held)).unwrap_or(usize::MAX);
        FrameBudget { charged: Some(Charged { access: self.clone(), identity, max, left, _turn: turn }) }
    }
}

impl FrameBudget {
    /// Refuses a new paging domain (its top-level table is one frame) when the budget has
    /// no frame left.
    pub(crate) fn reserve_one(&mut self) -> Result<(), Status> {
        match &mut self.charged {
            Some(c) if c.left == 0 => Err(c.refuse("a new domain needs 1 frame")),
            Some(c) => {
                c.left -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Maps through the driver within what is left of the budget, and charges what the map
    /// took. A map that would pass the quota is refused with the driver's
    /// [`DriverError::FrameLimit`], having written nothing; [`FrameBudget::status`] makes
    /// it the quota's refusal.
    pub(crate) fn map(
        &mut self,
        driver: &Driver,
        did: DomainId,
        iova: Iova,
        hpa: Hpa,
        len: u64,
        perm: Perm,
    ) -> Result<(), DriverError> {
        let Some(c) = &mut self.charged else {
            return driver.map(did, iova, hpa, len, perm);
        };
        let took = driver.map_within(did, iova, hpa, len, perm, c.left)?;
        c.left = c.left.saturating_sub(took);
        Ok(())
    }

    /// The status for a driver error of [`FrameBudget::map`]: a frame limit is the quota's
    /// `RESOURCE_EXHAUSTED` naming the identity (counted and logged as a quota refusal);
    /// anything else maps as usual.
    pub(crate) fn status(&self, e: DriverError) -> Status {
        match (e, &self.charged) {
            (DriverError::FrameLimit { needed, limit }, Some(c)) => {
                c.refuse(&format!("the map needs {needed} new frames, {limit} left"))
            }
            (e, _) => crate::service::status::driver(e),
        }
    }
}

impl Charged {
    fn refuse(&self, detail: &str) -> Status {
        self.access.over_quota(Quota::Frames, &self.identity, self.max, detail)
    }
}
