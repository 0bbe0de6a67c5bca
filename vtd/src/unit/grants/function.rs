//! The grants of one function: its granted untranslated ranges, the coverage of translated
//! addresses they give, the eviction order and the pending revocations that keep grants
//! apart. The table around it, the switch, shards and generations are in the parent module.

use crate::ids::DomainId;
use crate::unit::fault::Direction;
use std::collections::BTreeMap;
use std::collections::BTreeSet;

/// One grant: an untranslated range (its first address is the map key) completed to a
/// translated range of the same size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Grant {
    /// First untranslated address past the range.
    pub(super) end: u64,
    /// Translated address of the range's first byte.
    pub(super) translated: u64,
    pub(super) read: bool,
    pub(super) write: bool,
    /// When it was last completed (per function, increasing): the oldest is evicted first.
    pub(super) seq: u64,
    /// The shard generation it was recorded under, the oldest of the completions merged
    /// into it: a pending device-TLB invalidation revokes it only if this predates the
    /// descriptor.
    pub(super) stamp: u64,
}

/// A segment of translated addresses (its first address is the map key) and how many
/// grants allow reads and writes over all of it. Never both zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Cover {
    /// First translated address past the segment.
    pub(super) end: u64,
    pub(super) reads: u32,
    pub(super) writes: u32,
}

impl Cover {
    pub(super) fn allows(&self, access: Direction) -> bool {
        match access {
            Direction::Read => self.reads > 0,
            Direction::Write => self.writes > 0,
        }
    }
}

/// The grants of one function.
#[derive(Debug, Default)]
pub(super) struct FunctionGrants {
    /// The domains of the contexts its grants were made under (more than one when
    /// software moved the function to another domain and it translated again before the
    /// old domain's context-cache invalidation), for domain-selective invalidations. At
    /// most one entry per domain, and emptied with the grants.
    pub(super) domains: Vec<DomainId>,
    /// By first untranslated address; disjoint.
    pub(super) grants: BTreeMap<u64, Grant>,
    /// By first translated address; disjoint, coalesced (neighbours that touch differ).
    pub(super) cover: BTreeMap<u64, Cover>,
    /// (seq, first untranslated address) of every grant: the eviction order.
    pub(super) age: BTreeSet<(u64, u64)>,
    /// The `before` of each device-TLB invalidation processed for the function and not yet
    /// ended ([`PendingRevocation`](super::PendingRevocation)): grants whose stamps fall on different sides of one
    /// of them do not merge.
    pub(super) pending: BTreeSet<u64>,
    pub(super) next_seq: u64,
    /// Reused by `adjust`: the segments it replaces and their boundaries.
    pub(super) scratch_old: Vec<(u64, Cover)>,
    pub(super) scratch_points: Vec<u64>,
}

impl FunctionGrants {
    /// Whether a pending invalidation would revoke a grant stamped `a` and not one stamped
    /// `b`, or the reverse: such grants must stay apart.
    pub(super) fn separated(pending: &BTreeSet<u64>, a: u64, b: u64) -> bool {
        let (lo, hi) = (a.min(b), a.max(b));
        lo != hi && pending.range(lo + 1..=hi).next().is_some()
    }

    /// Grants `[iova, iova + len)` → `[translated, translated + len)` with `read`/`write`,
    /// recorded under generation `stamp`, superseding what overlapped it, and evicts the
    /// oldest grants past `capacity`. Returns how many were evicted.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn grant(
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
    pub(super) fn evict_past(&mut self, capacity: usize) -> usize {
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
    pub(super) fn drop_entry(&mut self, start: u64, seq: u64) {
        self.grants.remove(&start);
        self.age.remove(&(seq, start));
    }

    /// Revokes the untranslated range `[start, end)`: grants inside it go, grants that
    /// overlap it are cut to what lies outside. Returns whether anything was revoked.
    pub(super) fn revoke(&mut self, start: u64, end: u64) -> bool {
        self.revoke_before(start, end, u64::MAX)
    }

    /// Revokes the untranslated range `[start, end)` from the grants stamped before
    /// `before`, as [`Self::revoke`] does; younger grants stay whole.
    pub(super) fn revoke_before(&mut self, start: u64, end: u64, before: u64) -> bool {
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
    pub(super) fn adjust(&mut self, start: u64, end: u64, read: bool, write: bool, add: bool) {
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
    pub(super) fn permits(&self, addr: u64, len: u64, access: Direction) -> bool {
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

    pub(super) fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}
