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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use super::Unit;
use super::fault::Direction;
use super::invalidation::ContextInvalidation;
use super::request::{AtsEntry, overlaps_interrupt_range};
use crate::ids::{DomainId, Iova, SourceId};

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

/// One grant: an untranslated range (its first address is the map key) completed to a
/// translated range of the same size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Grant {
    /// First untranslated address past the range.
    end: u64,
    /// Translated address of the range's first byte.
    translated: u64,
    read: bool,
    write: bool,
    /// When it was last completed (per function, increasing): the oldest is evicted first.
    seq: u64,
    /// The shard generation it was recorded under, the oldest of the completions merged
    /// into it: a pending device-TLB invalidation revokes it only if this predates the
    /// descriptor.
    stamp: u64,
}

/// A segment of translated addresses (its first address is the map key) and how many
/// grants allow reads and writes over all of it. Never both zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cover {
    /// First translated address past the segment.
    end: u64,
    reads: u32,
    writes: u32,
}

impl Cover {
    fn allows(&self, access: Direction) -> bool {
        match access {
            Direction::Read => self.reads > 0,
            Direction::Write => self.writes > 0,
        }
    }
}

/// The grants of one function.
#[derive(Debug, Default)]
struct FunctionGrants {
    /// The domain of the context the last grant was made under, for domain-selective
    /// context-cache invalidations.
    did: Option<DomainId>,
    /// By first untranslated address; disjoint.
    grants: BTreeMap<u64, Grant>,
    /// By first translated address; disjoint, coalesced (neighbours that touch differ).
    cover: BTreeMap<u64, Cover>,
    /// (seq, first untranslated address) of every grant: the eviction order.
    age: BTreeSet<(u64, u64)>,
    /// The `before` of each device-TLB invalidation processed for the function and not yet
    /// ended ([`PendingRevocation`]): grants whose stamps fall on different sides of one
    /// of them do not merge.
    pending: BTreeSet<u64>,
    next_seq: u64,
    /// Reused by `adjust`: the segments it replaces and their boundaries.
    scratch_old: Vec<(u64, Cover)>,
    scratch_points: Vec<u64>,
}

impl FunctionGrants {
    /// Whether a pending invalidation would revoke a grant stamped `a` and not one stamped
    /// `b`, or the reverse: such grants must stay apart.
    fn separated(pending: &BTreeSet<u64>, a: u64, b: u64) -> bool {
        let (lo, hi) = (a.min(b), a.max(b));
        lo != hi && pending.range(lo + 1..=hi).next().is_some()
    }

    /// Grants `[iova, iova + len)` → `[translated, translated + len)` with `read`/`write`,
    /// recorded under generation `stamp`, superseding what overlapped it, and evicts the
    /// oldest grants past `capacity`. Returns how many were evicted.
    #[allow(clippy::too_many_arguments)]
    fn grant(
        &mut self,
        iova: u64,
        len: u64,
        translated: u64,
        read: bool,
        write: bool,
        stamp: u64,
        capacity: usize,
    ) -> usize {
        let end = iova.saturating_add(len);
        // Granted exactly so already (the device asked again): only its age changes, unless
        // a pending invalidation would revoke the old grant and not this completion.
        if let Some((&at, g)) = self.grants.range_mut(..=iova).next_back()
            && g.end >= end
            && (g.read, g.write) == (read, write)
            && g.translated.checked_add(iova - at) == Some(translated)
            && !Self::separated(&self.pending, g.stamp, stamp)
        {
            let old = std::mem::replace(&mut g.seq, self.next_seq);
            self.age.remove(&(old, at));
            self.age.insert((self.next_seq, at));
            self.next_seq += 1;
            return 0;
        }
        self.revoke(iova, end);
        self.adjust(translated, translated.saturating_add(len), read, write, true);
        let mut g = Grant { end, translated, read, write, seq: self.next_seq, stamp };
        self.next_seq += 1;
        let mut start = iova;
        // Merge with the left neighbour when it continues into this range in both spaces
        // and no pending invalidation tells them apart; the merged grant keeps the older
        // stamp.
        if let Some((&ls, l)) = self.grants.range(..iova).next_back()
            && l.end == iova
            && (l.read, l.write) == (read, write)
            && l.translated.checked_add(iova - ls) == Some(translated)
            && !Self::separated(&self.pending, l.stamp, stamp)
        {
            let l = *l;
            self.drop_entry(ls, l.seq);
            start = ls;
            g.translated = l.translated;
            g.stamp = g.stamp.min(l.stamp);
        }
        if let Some(r) = self.grants.get(&end).copied()
            && (r.read, r.write) == (read, write)
            && translated.checked_add(len) == Some(r.translated)
            && !Self::separated(&self.pending, r.stamp, stamp)
        {
            self.drop_entry(end, r.seq);
            g.end = r.end;
            g.stamp = g.stamp.min(r.stamp);
        }
        self.grants.insert(start, g);
        self.age.insert((g.seq, start));
        self.evict_past(capacity)
    }

    /// Evicts the oldest grants until at most `capacity` remain; returns how many went.
    fn evict_past(&mut self, capacity: usize) -> usize {
        let mut evicted = 0;
        while self.grants.len() > capacity {
            let Some((seq, at)) = self.age.pop_first() else { break };
            if let Some(old) = self.grants.remove(&at) {
                debug_assert_eq!(old.seq, seq);
                self.adjust(old.translated, old.translated + (old.end - at), old.read, old.write, false);
                evicted += 1;
            }
        }
        evicted
    }

    /// Forgets the grant at `start` without touching the coverage (a merge keeps it).
    fn drop_entry(&mut self, start: u64, seq: u64) {
        self.grants.remove(&start);
        self.age.remove(&(seq, start));
    }

    /// Revokes the untranslated range `[start, end)`: grants inside it go, grants that
    /// overlap it are cut to what lies outside. Returns whether anything was revoked.
    fn revoke(&mut self, start: u64, end: u64) -> bool {
        self.revoke_before(start, end, u64::MAX)
    }

    /// Revokes the untranslated range `[start, end)` from the grants stamped before
    /// `before`, as [`Self::revoke`] does; younger grants stay whole.
    fn revoke_before(&mut self, start: u64, end: u64, before: u64) -> bool {
        // Disjoint and sorted: the overlapping grants are the last ones starting before
        // `end`, back to the first that ends after `start`. What is put back lies outside
        // `[start, end)`, at `at` or above, so the search below `at` never meets it.
        let mut below = end;
        let mut hit = false;
        while let Some((&at, &g)) = self.grants.range(..below).next_back()
            && g.end > start
        {
            below = at;
            if g.stamp >= before {
                continue;
            }
            hit = true;
            self.drop_entry(at, g.seq);
            let (cut_start, cut_end) = (at.max(start), g.end.min(end));
            let cut_translated = g.translated + (cut_start - at);
            self.adjust(cut_translated, cut_translated + (cut_end - cut_start), g.read, g.write, false);
            if at < cut_start {
                self.grants.insert(at, Grant { end: cut_start, ..g });
                self.age.insert((g.seq, at));
            }
            if cut_end < g.end {
                let right = Grant { translated: g.translated + (cut_end - at), ..g };
                self.grants.insert(cut_end, right);
                self.age.insert((g.seq, cut_end));
            }
        }
        hit
    }

    /// Adds (or, with `add` false, removes) one grant's `read`/`write` over the translated
    /// range `[start, end)`, keeping the segments disjoint, non-zero and coalesced.
    fn adjust(&mut self, start: u64, end: u64, read: bool, write: bool, add: bool) {
        if start >= end || !(read || write) {
            return;
        }
        let sign = if add { 1 } else { -1 };
        let (dr, dw) = (sign * i64::from(read), sign * i64::from(write));
        // The segments that overlap or touch the range: everything whose counts or
        // coalescing can change.
        let first = match self.cover.range(..start).next_back() {
            Some((&k, c)) if c.end >= start => k,
            _ => start,
        };
        // Scratch buffers kept between calls: recording a grant allocates nothing once
        // they have grown.
        let (mut old, mut points) = (std::mem::take(&mut self.scratch_old), std::mem::take(&mut self.scratch_points));
        old.clear();
        points.clear();
        old.extend(self.cover.range(first..=end).map(|(k, c)| (*k, *c)));
        for (k, _) in &old {
            self.cover.remove(k);
        }
        points.extend([start, end]);
        for (k, c) in &old {
            points.extend([*k, c.end]);
        }
        points.sort_unstable();
        points.dedup();
        let mut pending: Option<(u64, Cover)> = None;
        let mut next_old = 0;
        for w in points.windows(2) {
            let (a, b) = (w[0], w[1]);
            while next_old < old.len() && old[next_old].1.end <= a {
                next_old += 1;
            }
            let (mut reads, mut writes) = match old.get(next_old) {
                Some((k, c)) if *k <= a => (i64::from(c.reads), i64::from(c.writes)),
                _ => (0, 0),
            };
            if a >= start && b <= end {
                reads += dr;
                writes += dw;
            }
            debug_assert!(reads >= 0 && writes >= 0, "coverage removed that was never added");
            let seg = Cover {
                end: b,
                reads: u32::try_from(reads.max(0)).unwrap_or(u32::MAX),
                writes: u32::try_from(writes.max(0)).unwrap_or(u32::MAX),
            };
            pending = match pending {
                Some((ps, p)) if p.end == a && (p.reads, p.writes) == (seg.reads, seg.writes) => {
                    Some((ps, Cover { end: b, ..p }))
                }
                other => {
                    if let Some((ps, p)) = other {
                        self.cover.insert(ps, p);
                    }
                    (seg.reads > 0 || seg.writes > 0).then_some((a, seg))
                }
            };
        }
        if let Some((ps, p)) = pending {
            self.cover.insert(ps, p);
        }
        (self.scratch_old, self.scratch_points) = (old, points);
    }

    /// Whether every byte of `[addr, addr + len)` is covered by a grant allowing `access`.
    fn permits(&self, addr: u64, len: u64, access: Direction) -> bool {
        let end = addr.saturating_add(len.max(1));
        let Some((_, first)) = self.cover.range(..=addr).next_back() else { return false };
        if first.end <= addr || !first.allows(access) {
            return false;
        }
        let mut at = first.end;
        if at >= end {
            return true;
        }
        for (&k, c) in self.cover.range(at..) {
            if k != at || !c.allows(access) {
                return false;
            }
            at = c.end;
            if at >= end {
                return true;
            }
        }
        false
    }

    fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
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
        f.did = Some(did);
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
            ContextInvalidation::Domain(did) => self.clear_where(|_, f| f.did == Some(did)),
            ContextInvalidation::Device { sid, function_mask, .. } => {
                for s in super::cache::context::masked_functions(sid, function_mask) {
                    self.clear(s);
                }
            }
        }
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
mod tests {
    use std::collections::BTreeMap as Map;

    use proptest::prelude::*;

    use super::*;
    use crate::ids::Hpa;

    const PAGE: u64 = 4096;

    fn entry(translated: u64, size_shift: u32, read: bool, write: bool) -> AtsEntry {
        AtsEntry {
            translated: Hpa(translated),
            size_shift,
            read,
            write,
            untranslated_only: false,
            exec: false,
            privileged: false,
            global: false,
        }
    }

    fn on(sids: &[SourceId], capacity: usize) -> GrantTable {
        let t = GrantTable::new(capacity);
        for s in sids {
            t.set(*s, true);
        }
        t
    }

    fn grant(t: &GrantTable, sid: SourceId, iova: u64, e: AtsEntry) -> Recorded {
        t.record(sid, t.ticket(sid), DomainId(1), Iova(iova), &e)
    }

    const A: SourceId = SourceId::new(1, 0, 0);
    const B: SourceId = SourceId::new(1, 0, 1);

    /// Recomputes the coverage from the grants and checks the stored one against it, and
    /// that the eviction order names exactly the grants.
    fn check_invariants(f: &FunctionGrants) {
        let mut expect = FunctionGrants::default();
        let mut prev_end = 0;
        for (&at, g) in &f.grants {
            assert!(at >= prev_end && g.end > at, "grants overlap or are empty: {:?}", f.grants);
            prev_end = g.end;
            expect.adjust(g.translated, g.translated + (g.end - at), g.read, g.write, true);
            assert!(f.age.contains(&(g.seq, at)));
        }
        assert_eq!(f.age.len(), f.grants.len());
        assert_eq!(f.cover, expect.cover, "coverage");
        for ((_, a), (b_start, _)) in f.cover.iter().zip(f.cover.iter().skip(1)) {
            assert!(a.end <= *b_start);
        }
    }

    #[test]
    fn adjacent_grants_merge_and_a_partial_revoke_cuts() {
        let t = on(&[A], 16);
        for p in 0..8u64 {
            assert_eq!(
                grant(&t, A, p * PAGE, entry(0x10_0000 + p * PAGE, 12, true, true)),
                Recorded::Granted { evicted: 0 }
            );
        }
        assert_eq!(t.len(A), 1, "eight contiguous pages merge into one grant");
        assert!(t.permits(A, 0x10_0000, 8 * PAGE, Direction::Write));
        t.revoke(A, 3 * PAGE, PAGE);
        assert_eq!(t.len(A), 2);
        assert!(!t.permits(A, 0x10_3000, 1, Direction::Read));
        assert!(t.permits(A, 0x10_2fff, 1, Direction::Read));
        assert!(t.permits(A, 0x10_4000, 4 * PAGE, Direction::Read));
        assert!(!t.permits(A, 0x10_2000, 2 * PAGE, Direction::Read), "a request spanning the hole");
    }

    #[test]
    fn permissions_are_as_completed() {
        let t = on(&[A], 16);
        grant(&t, A, 0, entry(0x20_0000, 12, true, false));
        assert!(t.permits(A, 0x20_0000, PAGE, Direction::Read));
        assert!(!t.permits(A, 0x20_0000, PAGE, Direction::Write));
        assert_eq!(grant(&t, A, 0x1000, entry(0x30_0000, 12, false, false)), Recorded::Nothing, "R=W=0");
        let mut u = entry(0xfee0_0000, 12, false, true);
        u.untranslated_only = true;
        assert_eq!(grant(&t, A, 0xfee0_0000, u), Recorded::Nothing, "U=1");
        assert_eq!(grant(&t, A, 0x2000, entry(0xfee0_0000, 12, true, true)), Recorded::Nothing, "interrupt range");
        assert!(!t.permits(B, 0x20_0000, 1, Direction::Read), "grants are per function");
    }

    #[test]
    fn superpages_grant_their_whole_range_and_a_new_completion_supersedes() {
        let t = on(&[A], 16);
        grant(&t, A, 0x20_1234, entry(0x4000_0000, 21, true, true));
        assert!(t.permits(A, 0x4000_0000 + 0x1f_f000, PAGE, Direction::Write));
        grant(&t, A, 0x20_0000, entry(0x5000_0000, 21, true, false));
        assert!(!t.permits(A, 0x4000_0000, 1, Direction::Read), "the old translation was superseded");
        assert!(t.permits(A, 0x5000_0000, 1, Direction::Read));
    }

    #[test]
    fn a_revocation_after_the_ticket_forces_a_retry() {
        let t = on(&[A], 16);
        let ticket = t.ticket(A);
        t.revoke(A, 0, PAGE);
        assert_eq!(t.record(A, ticket, DomainId(1), Iova(0), &entry(0x10_0000, 12, true, true)), Recorded::Raced);
        assert!(!t.permits(A, 0x10_0000, 1, Direction::Read));
        // Also when checking went off and on meanwhile.
        let ticket = t.ticket(A);
        t.set(A, false);
        t.set(A, true);
        assert_eq!(t.record(A, ticket, DomainId(1), Iova(0), &entry(0x10_0000, 12, true, true)), Recorded::Raced);
    }

    #[test]
    fn a_pending_revocation_spares_grants_recorded_after_the_descriptor() {
        let t = on(&[A], 16);
        let linear = |p: u64| entry(0x10_0000 + p * PAGE, 12, true, true);
        for p in 0..8u64 {
            grant(&t, A, p * PAGE, linear(p));
        }
        assert_eq!(t.len(A), 1);
        // Pages 2..=8 invalidated: nothing goes while the invalidation is pending.
        let pending = t.revoke_later(A, 2 * PAGE, 7 * PAGE).expect("checking is on");
        assert!(t.permits(A, 0x10_0000, 8 * PAGE, Direction::Read));
        // Translated again meanwhile: page 3 (granted already) and page 8 (new, adjacent).
        grant(&t, A, 3 * PAGE, linear(3));
        grant(&t, A, 8 * PAGE, linear(8));
        assert_eq!(t.len(A), 4, "old and new grants stay apart: 0-2, 3, 4-7, 8");
        assert_eq!(t.end_revocation(pending), 0);
        assert!(t.permits(A, 0x10_0000, 2 * PAGE, Direction::Read), "outside the range");
        assert!(!t.permits(A, 0x10_2000, 1, Direction::Read), "recorded before: revoked");
        assert!(t.permits(A, 0x10_3000, PAGE, Direction::Write), "recorded after: kept");
        assert!(!t.permits(A, 0x10_4000, 1, Direction::Read));
        assert!(!t.permits(A, 0x10_7000, 1, Direction::Read));
        assert!(t.permits(A, 0x10_8000, PAGE, Direction::Read), "recorded after: kept");
        assert_eq!(t.len(A), 3);
        // With none pending, old and new merge again.
        grant(&t, A, 2 * PAGE, linear(2));
        assert_eq!(t.len(A), 2, "0-3 and 8");
    }

    #[test]
    fn a_translation_computed_before_the_descriptor_is_revoked_at_its_end() {
        let t = on(&[A], 16);
        // Recorded before the descriptor: revoked when the invalidation ends.
        let ticket = t.ticket(A);
        assert!(matches!(
            t.record(A, ticket, DomainId(1), Iova(0), &entry(0x10_0000, 12, true, true)),
            Recorded::Granted { .. }
        ));
        let pending = t.revoke_later(A, 0, PAGE).expect("on");
        assert!(t.permits(A, 0x10_0000, 1, Direction::Read));
        // Computed before the descriptor, recorded after: computed again.
        let stale = t.ticket(A);
        let again = t.revoke_later(A, 0, PAGE).expect("on");
        assert_eq!(t.record(A, stale, DomainId(1), Iova(0), &entry(0x10_0000, 12, true, true)), Recorded::Raced);
        t.end_revocation(pending);
        assert!(!t.permits(A, 0x10_0000, 1, Direction::Read));
        // Computed after both descriptors: survives them.
        assert!(matches!(grant(&t, A, 0, entry(0x10_0000, 12, true, true)), Recorded::Granted { .. }));
        t.end_revocation(again);
        assert!(t.permits(A, 0x10_0000, 1, Direction::Read));
        // Checking off: nothing to end.
        t.set(A, false);
        assert_eq!(t.revoke_later(A, 0, PAGE), None);
    }

    #[test]
    fn nothing_is_recorded_with_checking_off() {
        let t = GrantTable::new(16);
        assert_eq!(grant(&t, A, 0, entry(0x10_0000, 12, true, true)), Recorded::Nothing);
        assert_eq!(t.len(A), 0);
    }

    #[test]
    fn context_invalidations_clear_the_functions_they_name() {
        let t = on(&[A, B, SourceId::new(2, 0, 0)], 16);
        for s in [A, B, SourceId::new(2, 0, 0)] {
            grant(&t, s, 0, entry(0x10_0000, 12, true, true));
        }
        t.context_invalidated(ContextInvalidation::Device { did: DomainId(1), sid: A, function_mask: 0 });
        assert_eq!((t.len(A), t.len(B)), (0, 1));
        t.context_invalidated(ContextInvalidation::Domain(DomainId(2)));
        assert_eq!(t.len(B), 1, "another domain");
        t.context_invalidated(ContextInvalidation::Domain(DomainId(1)));
        assert_eq!((t.len(B), t.len(SourceId::new(2, 0, 0))), (0, 0));
    }

    #[test]
    fn the_bound_evicts_the_oldest() {
        let t = on(&[A], 4);
        let mut evicted = 0;
        // Not contiguous in the translated space: no merging.
        for p in 0..10u64 {
            if let Recorded::Granted { evicted: n } =
                grant(&t, A, p * PAGE, entry(0x100_0000 + p * 2 * PAGE, 12, true, true))
            {
                evicted += n;
            }
        }
        assert_eq!((t.len(A), evicted), (4, 6));
        assert!(!t.permits(A, 0x100_0000, 1, Direction::Read), "the oldest went");
        assert!(t.permits(A, 0x100_0000 + 18 * PAGE, 1, Direction::Read), "the newest stays");
    }

    /// One step of the property test: small address spaces so that grants overlap, alias
    /// and touch often.
    #[derive(Clone, Debug)]
    enum Op {
        Grant {
            sid: usize,
            iova_page: u64,
            pages_log2: u32,
            hpa_page: u64,
            read: bool,
            write: bool,
        },
        Revoke {
            sid: usize,
            page: u64,
            pages: u64,
        },
        /// A device-TLB descriptor processed: revokes when an `End` picks it.
        Begin {
            sid: usize,
            page: u64,
            pages: u64,
        },
        /// Ends one of the pending revocations (an index into them, modulo their number).
        End {
            pick: usize,
        },
        Clear {
            sid: usize,
        },
        Check {
            sid: usize,
            hpa_page: u64,
            offset: u64,
            len: u64,
            write: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..2usize, 0..32u64, 0..3u32, 0..32u64, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
                |(sid, iova_page, pages_log2, hpa_page, linear, read, write)| {
                    // Half the grants map linearly (translated = untranslated + 4 pages), so
                    // neighbours merge; the others land anywhere, so pages alias.
                    let hpa_page = if linear { iova_page + 4 } else { hpa_page };
                    Op::Grant { sid, iova_page, pages_log2, hpa_page, read, write }
                }
            ),
            2 => (0..2usize, 0..32u64, 1..8u64).prop_map(|(sid, page, pages)| Op::Revoke { sid, page, pages }),
            2 => (0..2usize, 0..32u64, 1..8u64).prop_map(|(sid, page, pages)| Op::Begin { sid, page, pages }),
            2 => (0..8usize).prop_map(|pick| Op::End { pick }),
            1 => (0..2usize).prop_map(|sid| Op::Clear { sid }),
            4 => (0..2usize, 0..34u64, 0..PAGE, 1..3 * PAGE, any::<bool>())
                .prop_map(|(sid, hpa_page, offset, len, write)| Op::Check { sid, hpa_page, offset, len, write }),
        ]
    }

    /// The reference: per function, untranslated page → (translated page, R, W, the
    /// number of descriptors processed before it was completed).
    type Model = Vec<Map<u64, (u64, bool, bool, u64)>>;

    fn model_permits(m: &Map<u64, (u64, bool, bool, u64)>, addr: u64, len: u64, write: bool) -> bool {
        (addr / PAGE..=(addr + len - 1) / PAGE)
            .all(|p| m.values().any(|&(h, r, w, _)| h == p && if write { w } else { r }))
    }

    /// Runs `ops` on a table with room for `capacity` grants and on the model; returns
    /// whether the table ever evicted.
    fn run(ops: &[Op], capacity: usize) -> Result<bool, TestCaseError> {
        let sids = [A, SourceId::new(3, 1, 0)];
        let t = on(&sids, capacity);
        let mut model: Model = vec![Map::new(); 2];
        let mut evicted_any = false;
        // Descriptors processed so far, and the pending ones: the table's, with the
        // function, its pages and the count they were processed at in the model.
        let mut processed = 0u64;
        let mut pending: Vec<(PendingRevocation, usize, std::ops::Range<u64>, u64)> = Vec::new();
        for op in ops {
            match *op {
                Op::Grant { sid, iova_page, pages_log2, hpa_page, read, write } => {
                    let n = 1u64 << pages_log2;
                    let (iova, hpa) = ((iova_page & !(n - 1)) * PAGE, (hpa_page & !(n - 1)) * PAGE);
                    let r = grant(&t, sids[sid], iova + 0x123, entry(hpa, 12 + pages_log2, read, write));
                    if read || write {
                        for i in 0..n {
                            model[sid].insert(iova / PAGE + i, (hpa / PAGE + i, read, write, processed));
                        }
                        let Recorded::Granted { evicted } = r else {
                            return Err(TestCaseError::fail(format!("{r:?}")));
                        };
                        evicted_any |= evicted > 0;
                    } else {
                        prop_assert_eq!(r, Recorded::Nothing);
                    }
                }
                Op::Revoke { sid, page, pages } => {
                    evicted_any |= t.revoke(sids[sid], page * PAGE, pages * PAGE) > 0;
                    model[sid].retain(|p, _| !(page..page + pages).contains(p));
                }
                Op::Begin { sid, page, pages } => {
                    processed += 1;
                    let p = t.revoke_later(sids[sid], page * PAGE, pages * PAGE).expect("checking is on");
                    pending.push((p, sid, page..page + pages, processed));
                }
                Op::End { pick } => {
                    if !pending.is_empty() {
                        let (p, sid, pages, before) = pending.remove(pick % pending.len());
                        evicted_any |= t.end_revocation(p) > 0;
                        model[sid].retain(|p, v| !(pages.contains(p) && v.3 < before));
                    }
                }
                Op::Clear { sid } => {
                    t.clear(sids[sid]);
                    model[sid].clear();
                }
                Op::Check { sid, hpa_page, offset, len, write } => {
                    let addr = hpa_page * PAGE + offset;
                    let access = if write { Direction::Write } else { Direction::Read };
                    let got = t.permits(sids[sid], addr, len, access);
                    let want = model_permits(&model[sid], addr, len, write);
                    if evicted_any {
                        // Eviction only ever takes away.
                        prop_assert!(!got || want, "permits what the model does not: {op:?}");
                    } else {
                        prop_assert_eq!(got, want, "{:?}", op);
                    }
                }
            }
            for (i, s) in sids.iter().enumerate() {
                let functions = t.shard(*s).functions.read();
                let Some(f) = functions.get(s) else {
                    prop_assert!(evicted_any || model[i].is_empty());
                    continue;
                };
                check_invariants(f);
                prop_assert!(f.grants.len() <= capacity);
                // The grants, page by page.
                let mut pages = Map::new();
                for (&at, g) in &f.grants {
                    for p in 0..(g.end - at) / PAGE {
                        pages.insert(at / PAGE + p, (g.translated / PAGE + p, g.read, g.write));
                    }
                }
                let model_pages: Map<u64, (u64, bool, bool)> =
                    model[i].iter().map(|(p, &(h, r, w, _))| (*p, (h, r, w))).collect();
                if evicted_any {
                    prop_assert!(pages.iter().all(|(p, v)| model_pages.get(p) == Some(v)), "evicted table grants more");
                } else {
                    prop_assert_eq!(&pages, &model_pages);
                }
            }
        }
        Ok(evicted_any)
    }

    proptest! {
        #[test]
        fn matches_a_page_set_model(ops in proptest::collection::vec(op(), 1..80)) {
            run(&ops, usize::MAX)?;
        }

        #[test]
        fn a_small_bound_only_takes_away(ops in proptest::collection::vec(op(), 1..80)) {
            run(&ops, 3)?;
        }
    }
}
