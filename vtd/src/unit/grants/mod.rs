//! Translated-request checking, a dmar extension that VT-d hardware does not have: the
//! ranges each function was granted by translation completions, and the per-function
//! switch that turns the check on.
//!
//! VT-d trusts device TLBs. A function whose context entry has TT=01b may send translated
//! requests (AT=10b) to any host address outside the interrupt range, and the unit only
//! checks the context and the interrupt range (VT-d 4.2.4, 9.3). With checking on for a
//! function ([`Unit::set_translated_check`]), the unit accepts a translated request only
//! inside a range it completed for that function (an ATS translation completion, VT-d
//! 4.2.3; PCIe ATS 10.2.3) with the permission the request needs, and that no invalidation
//! has revoked since. The operator turns it on per function at attach; it is emulator
//! configuration, not a register or a context-entry bit.
//!
//! This module owns:
//! - the switch: one bit per source id, read with one load on the request paths, so a unit
//!   with checking off pays one predicted branch and takes no lock;
//! - per function, its grants: disjoint untranslated ranges, each with the translated
//!   address it completed to and its R and W. A new completion for an untranslated range
//!   supersedes what was granted for it (the device TLB replaces its entry); grants that
//!   are adjacent in both address spaces with the same permissions merge into one;
//! - per function, the coverage of translated addresses: disjoint segments counting the
//!   grants that allow reads and writes there (two untranslated ranges may complete to the
//!   same host page), which is what a translated request is checked against, in
//!   O(log n);
//! - the bound: at most [`DEFAULT_GRANTS_PER_FUNCTION`] grants per function unless the unit
//!   is configured otherwise ([`super::UnitConfig::with_translated_grants`]); past it the
//!   oldest grant is evicted, and the unit counts it. The coverage then has at most
//!   `2 * cap + 1` segments, so nothing a device does grows the table without bound;
//! - revocation: removing exactly the invalidated untranslated pages (a grant partly
//!   covered is cut, the rest stays), clearing a function, a domain's functions or all;
//! - the window of a device-TLB invalidation ([`PendingRevocation`]): revocation in two
//!   steps, [`GrantTable::revoke_later`] when the unit processes the descriptor and
//!   [`GrantTable::end_revocation`] when the invalidation ends (the function's Invalidation
//!   Completion or the time-out, `invalidation::ports`). PCIe 10.3 lets a function use a
//!   translation until it has processed the Invalidate Request, and software reuses the
//!   memory only after the wait descriptor that waits for the completion (VT-d 6.5.2.8):
//!   in between, the function's DMA is legitimate. The end revokes only grants recorded
//!   before the descriptor was processed: each grant carries a stamp, the shard generation
//!   it was recorded under (below), and the descriptor remembers the generation it moved
//!   to (`before`). A grant recorded since (the function translated again after the
//!   descriptor) survives. Merged grants keep the older stamp, and grants a pending
//!   `before` falls between are not merged (nor is an old grant merely refreshed by a new
//!   completion), so a revocation takes neither more nor less than the model of
//!   independent pages would; the table stays bounded by the per-function bound;
//! - the race between a translation and an invalidation: a generation per shard, moved by
//!   every revocation (for a device-TLB invalidation, when its descriptor is processed)
//!   under the shard's lock. A translation reads it before it starts (a [`Ticket`]) and
//!   records its grant only if it is unchanged, under the shard's lock, stamped with it;
//!   otherwise the unit translates again. This is the idea of the unit's invalidation
//!   epoch (no cache fill outlives an invalidation that completed after the walk read the
//!   tables), per shard so that other functions' invalidations rarely force a retry.
//!   With the window it still holds: a translation computed before the descriptor was
//!   processed took its ticket before the generation moved. If it records first (the lock
//!   orders the two), its stamp is below `before` and the end revokes it; if it records
//!   after, its ticket is stale and it is computed again, by a walk that starts after the
//!   descriptor, so after the IOTLB invalidation software queued before it, and that
//!   reads the new tables. A grant stamped `before` or later thus comes from such a walk.
//!   Ending a revocation moves no generation: a translation in flight then either took its
//!   ticket after the descriptor (fresh) or before it (already stale).
//!
//! Revoked at once, with no window: context-cache invalidations (VT-d 6.5.1.1), unbinding
//! the device port and switching the check. None is an ATS invalidation: nothing is sent
//! to the function and nothing acknowledges it. A context-cache invalidation says the
//! function's context entry changed, after which VT-d itself checks its translated
//! requests against the new entry (VT-d 4.2.4) whatever its device TLB holds, so no
//! device can count on DMA across it; without a port the function has no device TLB; the
//! switch is configuration. A whole-range device-TLB
//! invalidation is an ATS invalidation like any other and has the same window.
//!
//! Not here: when grants are recorded (`request`, [`Unit::ats_translate`]) and checked
//! (`request`, [`Unit::check_translated`]), when revocations start and end (the
//! invalidation queue's device-TLB descriptor and the device ports' completions and
//! time-outs), the context-cache invalidations in `invalidation::caches`, unbinding a
//! device port, and the driver's attach that turns checking on.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use super::Unit;
use super::fault::Direction;
use super::invalidation::ContextInvalidation;
use super::request::{AtsEntry, overlaps_interrupt_range};
use crate::ids::{DomainId, Iova, SourceId};
use function::FunctionGrants;

mod function;

/// Grants a function may hold at once unless the unit is configured otherwise. Devices
/// drop translations silently, so grants outlive them until an invalidation, and the
/// oldest (by its last completion) is evicted first; a device that still holds an evicted
/// translation is refused when it uses it. Twice the default device TLB of dmar's agent
/// (2048 entries) keeps that rare, and merging makes a linearly mapped range one grant.
/// Each grant costs about 150 bytes, so one function's table stays under 1 MiB.
pub const DEFAULT_GRANTS_PER_FUNCTION: usize = 4096;

/// Shards of the per-function tables; a function's shard is its source id modulo this.
const SHARDS: usize = 64;
/// Words of the switch bitmap: one bit per 16-bit source id.
const SWITCH_WORDS: usize = (u16::MAX as usize + 1) / 64;

/// The grant generation a translation read before it started; its grant is recorded only
/// if no revocation ran in the function's shard since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

/// What recording a completion did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// The range was granted; `evicted` older grants made room for it.
    Granted {
        /// Grants evicted by the per-function bound.
        evicted: usize,
    },
    /// Nothing to grant: R=W=0, U=1, the interrupt range, or checking was switched off
    /// meanwhile.
    Nothing,
    /// A revocation ran since the ticket was taken: the translation may be stale and must
    /// be computed again.
    Raced,
}

/// A device-TLB invalidation the unit has processed for a function and that has not ended
/// yet: what it will revoke when the function acknowledges it or it times out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PendingRevocation {
    sid: SourceId,
    /// The invalidated untranslated range, `[start, end)`.
    start: u64,
    end: u64,
    /// The shard generation right after the descriptor was processed: grants stamped
    /// before it are revoked, grants recorded since are not.
    before: u64,
}

/// Hashes a source id with one multiplication (Fibonacci hashing): the keys are 16-bit
/// requester ids the operator attached, not attacker-chosen strings, and the default
/// hasher cost more than the rest of a lookup.
#[derive(Debug, Default)]
struct SidHasher(u64);

impl Hasher for SidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Per shard, the functions with grants.
type Functions = HashMap<SourceId, FunctionGrants, BuildHasherDefault<SidHasher>>;

/// One shard: the tables of the functions whose source id falls in it, and the generation
/// every revocation in it bumps.
#[derive(Debug, Default)]
struct Shard {
    generation: AtomicU64,
    functions: RwLock<Functions>,
}

/// Every function's grants and the per-function switch.
#[derive(Debug)]
pub(crate) struct GrantTable {
    /// Bit `sid % 64` of word `sid / 64`: checking is on for `sid`.
    switch: [AtomicU64; SWITCH_WORDS],
    shards: Box<[Shard]>,
    /// Grants per function.
    capacity: usize,
}

impl GrantTable {
    /// An empty table, checking off for every function, at most `capacity` grants each.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            switch: [const { AtomicU64::new(0) }; SWITCH_WORDS],
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            capacity: capacity.max(1),
        }
    }

    fn shard(&self, sid: SourceId) -> &Shard {
        &self.shards[usize::from(sid.0) % SHARDS]
    }

    /// Whether checking is on for `sid`: one load, no lock (the request paths' only cost
    /// when it is off).
    #[inline]
    pub(crate) fn checks(&self, sid: SourceId) -> bool {
        let (word, bit) = (usize::from(sid.0) / 64, sid.0 % 64);
        self.switch[word].load(Ordering::SeqCst) & (1 << bit) != 0
    }

    /// Switches checking for `sid`; either way its grants are dropped (a function switched
    /// on starts with none).
    pub(crate) fn set(&self, sid: SourceId, on: bool) {
        let shard = self.shard(sid);
        let mut functions = shard.functions.write();
        let (word, bit) = (usize::from(sid.0) / 64, 1u64 << (sid.0 % 64));
        if on {
            self.switch[word].fetch_or(bit, Ordering::SeqCst);
        } else {
            self.switch[word].fetch_and(!bit, Ordering::SeqCst);
        }
        shard.generation.fetch_add(1, Ordering::SeqCst);
        functions.remove(&sid);
    }

    /// The ticket a translation for `sid` takes before it reads anything.
    #[inline]
    pub(crate) fn ticket(&self, sid: SourceId) -> Ticket {
        Ticket(self.shard(sid).generation.load(Ordering::SeqCst))
    }

    /// Records the completion `entry` the unit produced for `iova` from `sid`, under the
    /// context of domain `did`, if no revocation ran since `ticket`.
    pub(crate) fn record(
        &self,
        sid: SourceId,
        ticket: Ticket,
        did: DomainId,
        iova: Iova,
        entry: &AtsEntry,
    ) -> Recorded {
        if !(entry.read || entry.write) || entry.untranslated_only || entry.size_shift >= 64 {
            return Recorded::Nothing;
        }
        let len = 1u64 << entry.size_shift;
        // The unit never completes a translation into the interrupt range (it answers CA);
        // it is never granted whatever happens (VT-d 3.14).
        if overlaps_interrupt_range(entry.translated.0, len) {
            return Recorded::Nothing;
        }
        let shard = self.shard(sid);
        let mut functions = shard.functions.write();
        if shard.generation.load(Ordering::SeqCst) != ticket.0 {
            return Recorded::Raced;
        }
        if !self.checks(sid) {
            return Recorded::Nothing;
        }
        let f = functions.entry(sid).or_default();
        if !f.domains.contains(&did) {
            f.domains.push(did);
        }
        let base = iova.0 & !(len - 1);
        let evicted = f.grant(base, len, entry.translated.0, entry.read, entry.write, ticket.0, self.capacity);
        Recorded::Granted { evicted }
    }

    /// Whether `sid` holds grants allowing `access` over every byte of `[addr, addr + len)`.
    pub(crate) fn permits(&self, sid: SourceId, addr: u64, len: u64, access: Direction) -> bool {
        self.shard(sid).functions.read().get(&sid).is_some_and(|f| f.permits(addr, len, access))
    }

    /// Revokes the untranslated range `[start, start + len)` of `sid` now (a device-TLB
    /// invalidation for a function without a device TLB). Cutting a grant in two can take
    /// a function past its bound: returns how many grants were evicted for it.
    pub(crate) fn revoke(&self, sid: SourceId, start: u64, len: u64) -> usize {
        self.revoke_later(sid, start, len).map_or(0, |p| self.end_revocation(p))
    }

    /// A device-TLB invalidation of `[start, start + len)` was processed for `sid`: moves
    /// the generation, whether or not checking is on, so that a translation in flight is
    /// computed again, and returns what [`Self::end_revocation`] revokes when the
    /// invalidation ends (`None` with checking off). Nothing is revoked yet.
    pub(crate) fn revoke_later(&self, sid: SourceId, start: u64, len: u64) -> Option<PendingRevocation> {
        let shard = self.shard(sid);
        let mut functions = shard.functions.write();
        let before = shard.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if !self.checks(sid) {
            return None;
        }
        // A function with no table now gets one only from grants stamped `before` or later,
        // which this never separates.
        if let Some(f) = functions.get_mut(&sid) {
            f.pending.insert(before);
        }
        Some(PendingRevocation { sid, start, end: start.saturating_add(len), before })
    }

    /// The invalidation `p` ended (the function acknowledged it, or it timed out): revokes
    /// its range from the grants recorded before it was processed. Returns how many grants
    /// were evicted by the bound after cutting.
    pub(crate) fn end_revocation(&self, p: PendingRevocation) -> usize {
        let mut functions = self.shard(p.sid).functions.write();
        let Some(f) = functions.get_mut(&p.sid) else { return 0 };
        f.pending.remove(&p.before);
        f.revoke_before(p.start, p.end, p.before);
        let evicted = f.evict_past(self.capacity);
        if f.is_empty() {
            functions.remove(&p.sid);
        }
        evicted
    }

    /// Drops every grant of the functions `drop` selects, in every shard.
    fn clear_where(&self, mut drop: impl FnMut(SourceId, &FunctionGrants) -> bool) {
        for shard in self.shards.iter() {
            shard.generation.fetch_add(1, Ordering::SeqCst);
            let mut functions = shard.functions.write();
            functions.retain(|sid, f| !drop(*sid, f));
        }
    }

    /// Drops every grant of `sid`.
    pub(crate) fn clear(&self, sid: SourceId) {
        let shard = self.shard(sid);
        shard.generation.fetch_add(1, Ordering::SeqCst);
        shard.functions.write().remove(&sid);
    }

    /// A context-cache invalidation (VT-d 6.5.1.1): software changed context entries, so
    /// what the functions they name were granted under the old entries goes.
    pub(crate) fn context_invalidated(&self, inv: ContextInvalidation) {
        match inv {
            ContextInvalidation::Global => self.clear_where(|_, _| true),
            ContextInvalidation::Domain(did) => self.clear_where(|_, f| f.domains.contains(&did)),
            ContextInvalidation::Device { sid, function_mask, .. } => {
                for s in super::cache::context::masked_functions(sid, function_mask) {
                    self.clear(s);
                }
            }
        }
    }

    /// Back to the state [`Self::new`] builds: checking off for every function, no grant
    /// held. Each shard's generation moves under its lock, so a translation in flight
    /// records nothing it computed before (its ticket is stale) and is computed again
    /// against the reset unit.
    pub(crate) fn reset(&self) {
        for word in &self.switch {
            word.store(0, Ordering::SeqCst);
        }
        self.clear_where(|_, _| true);
    }

    /// The number of grants `sid` holds (merged ranges count once).
    pub(crate) fn len(&self, sid: SourceId) -> usize {
        self.shard(sid).functions.read().get(&sid).map_or(0, |f| f.grants.len())
    }
}

impl Unit {
    /// Switches translated-request checking for `sid` on or off.
    ///
    /// A dmar extension, not VT-d: hardware lets a TT=01b function send translated requests
    /// anywhere outside the interrupt range (VT-d 4.2.4). With checking on, a translated
    /// request must fall inside a range this unit completed for `sid` with the permission it
    /// needs, not revoked since by a device-TLB invalidation (once the function acknowledged
    /// it or it timed out), a context-cache invalidation naming `sid`, or unbinding its
    /// device port; otherwise it is refused and recorded as a fault (no read 0x06 or no
    /// write 0x05, address type translated). Either way the function's grants are dropped. The driver calls this at attach and detach; it is
    /// emulator configuration, kept out of the context entry.
    pub fn set_translated_check(&self, sid: SourceId, on: bool) {
        self.grants.set(sid, on);
    }

    /// Whether translated-request checking is on for `sid`.
    pub fn translated_check(&self, sid: SourceId) -> bool {
        self.grants.checks(sid)
    }

    /// How many grants (merged ranges) `sid` holds for translated-request checking: for
    /// tests and diagnostics.
    pub fn translated_grants(&self, sid: SourceId) -> usize {
        self.grants.len(sid)
    }
}

#[cfg(test)]
mod tests;
