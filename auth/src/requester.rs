//! The requester ids a device identity may bind: inclusive ranges of [`SourceId`]s and a set
//! of them with a fast membership test.
//!
//! This module owns the range syntax (`00:01.0-00:01.7`, or one id `02:00.0`) and the set's
//! normal form. It does not know who holds a set (that is [`crate::policy`]) nor whether an
//! id is currently bound by some link (that is the server's link registry).

use std::fmt;
use std::str::FromStr;

use dmar_vtd::SourceId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An inclusive range of requester ids, `first <= last` in `bus:dev.fn` order (the order of
/// the 16-bit requester id, so `00:1f.7` is followed by `01:00.0`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequesterIdRange {
    first: SourceId,
    last: SourceId,
}

/// Why a string or a pair of ids is not a requester id range. Messages do not repeat the
/// input: it may come from a file that is not what it seems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequesterIdRangeError {
    /// Not `bb:dd.f` or `bb:dd.f-bb:dd.f` in hexadecimal.
    #[error("invalid requester id range: expected bb:dd.f or bb:dd.f-bb:dd.f in hex, like 00:01.0-00:01.7")]
    Syntax,
    /// The range is written backwards.
    #[error("invalid requester id range: the first id is after the last")]
    Reversed,
}

impl RequesterIdRange {
    /// The ids from `first` to `last` inclusive; refuses a reversed range instead of
    /// silently swapping or emptying it, since either would change what the operator meant.
    pub fn new(first: SourceId, last: SourceId) -> Result<Self, RequesterIdRangeError> {
        if first > last {
            return Err(RequesterIdRangeError::Reversed);
        }
        Ok(Self { first, last })
    }

    /// One id.
    pub const fn single(sid: SourceId) -> Self {
        Self { first: sid, last: sid }
    }

    /// Every requester id on segment 0: `00:00.0-ff:1f.7`.
    pub const fn all() -> Self {
        Self { first: SourceId(0), last: SourceId(u16::MAX) }
    }

    /// The lowest id in the range.
    pub const fn first(self) -> SourceId {
        self.first
    }

    /// The highest id in the range.
    pub const fn last(self) -> SourceId {
        self.last
    }

    /// True when `sid` is in the range.
    pub fn contains(self, sid: SourceId) -> bool {
        self.first <= sid && sid <= self.last
    }

    /// How many ids the range holds (1 to 65536; a range is never empty).
    pub fn count(self) -> u32 {
        u32::from(self.last.0 - self.first.0) + 1
    }
}

impl fmt::Display for RequesterIdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}-{}", self.first, self.last) }
    }
}

impl fmt::Debug for RequesterIdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequesterIdRange({self})")
    }
}

impl FromStr for RequesterIdRange {
    type Err = RequesterIdRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |t: &str| t.trim().parse::<SourceId>().map_err(|_| RequesterIdRangeError::Syntax);
        match s.split_once('-') {
            Some((first, last)) => Self::new(parse(first)?, parse(last)?),
            None => Ok(Self::single(parse(s)?)),
        }
    }
}

impl Serialize for RequesterIdRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RequesterIdRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(crate::de::TextVisitor::new("a requester id range like 00:01.0-00:01.7", |s| {
            s.parse::<RequesterIdRange>().map_err(|e| e.to_string())
        }))
    }
}

/// A set of requester ids as sorted, disjoint, non-adjacent inclusive ranges.
///
/// The normal form makes equality structural and `contains` a binary search over a handful
/// of ranges: the link service asks it once per bind, and a policy lists few ranges.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct RequesterIdSet {
    ranges: Vec<RequesterIdRange>,
}

impl RequesterIdSet {
    /// The empty set: an identity without the device role binds nothing.
    pub const fn empty() -> Self {
        Self { ranges: Vec::new() }
    }

    /// Every requester id: what the permissive policy grants.
    pub fn all() -> Self {
        Self { ranges: vec![RequesterIdRange::all()] }
    }

    /// The union of `ranges`, in normal form whatever their order or overlap.
    pub fn from_ranges(ranges: impl IntoIterator<Item = RequesterIdRange>) -> Self {
        let mut sorted: Vec<RequesterIdRange> = ranges.into_iter().collect();
        sorted.sort_unstable();
        let mut merged: Vec<RequesterIdRange> = Vec::with_capacity(sorted.len());
        for r in sorted {
            match merged.last_mut() {
                // Overlapping or touching (last + 1 == first): extend.
                Some(prev) if u32::from(r.first.0) <= u32::from(prev.last.0) + 1 => {
                    prev.last = prev.last.max(r.last);
                }
                _ => merged.push(r),
            }
        }
        Self { ranges: merged }
    }

    /// True when `sid` is in the set.
    pub fn contains(&self, sid: SourceId) -> bool {
        // The first range that does not end before `sid` is the only one that can hold it.
        let i = self.ranges.partition_point(|r| r.last < sid);
        self.ranges.get(i).is_some_and(|r| r.first <= sid)
    }

    /// True when the set holds no id.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many ids the set holds (0 to 65536).
    pub fn len(&self) -> u32 {
        self.ranges.iter().map(|r| r.count()).sum()
    }

    /// The ranges in normal form, ascending.
    pub fn ranges(&self) -> &[RequesterIdRange] {
        &self.ranges
    }
}

impl FromIterator<RequesterIdRange> for RequesterIdSet {
    fn from_iter<I: IntoIterator<Item = RequesterIdRange>>(iter: I) -> Self {
        Self::from_ranges(iter)
    }
}

impl fmt::Debug for RequesterIdSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.ranges).finish()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn range(s: &str) -> RequesterIdRange {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_print() {
        let r = range("00:01.0-00:01.7");
        assert_eq!((r.first(), r.last()), (SourceId::new(0, 1, 0), SourceId::new(0, 1, 7)));
        assert_eq!(r.to_string(), "00:01.0-00:01.7");
        assert_eq!(r.count(), 8);
        assert_eq!(range("02:00.0").to_string(), "02:00.0");
        assert_eq!(range("02:00.0-02:00.0"), RequesterIdRange::single(SourceId::new(2, 0, 0)));
        assert_eq!(range("00:00.0-ff:1f.7"), RequesterIdRange::all());
        assert_eq!(RequesterIdRange::all().count(), 65536);
    }

    #[test]
    fn bad_ranges_are_refused_without_echo() {
        assert_eq!("00:01.7-00:01.0".parse::<RequesterIdRange>(), Err(RequesterIdRangeError::Reversed));
        for bad in ["", "-", "00:01.0-", "-00:01.0", "00:01.0-00:01.7-00:02.0", "00:20.0", "secret"] {
            let err = bad.parse::<RequesterIdRange>().unwrap_err();
            assert_eq!(err, RequesterIdRangeError::Syntax, "{bad:?}");
        }
        let msg = "zz:zz.z".parse::<RequesterIdRange>().unwrap_err().to_string();
        assert!(!msg.contains("zz"), "{msg}");
    }

    #[test]
    fn sets_merge_overlapping_and_touching_ranges() {
        let set = RequesterIdSet::from_ranges([range("00:02.0"), range("00:01.0-00:01.7"), range("00:01.4-00:01.5")]);
        assert_eq!(set.ranges(), &[range("00:01.0-00:02.0")]);
        assert_eq!(set.len(), 9);
        let set = RequesterIdSet::from_ranges([range("00:03.0"), range("00:01.0")]);
        assert_eq!(set.ranges(), &[range("00:01.0"), range("00:03.0")]);
        assert!(RequesterIdSet::empty().is_empty());
        assert!(!RequesterIdSet::empty().contains(SourceId(0)));
        assert!(RequesterIdSet::all().contains(SourceId(u16::MAX)));
    }

    fn any_range() -> impl Strategy<Value = RequesterIdRange> {
        // Small spans near a few hot spots give overlaps, adjacency and edges often.
        let point = prop_oneof![0u16..64, 0xff00u16..=0xffff, any::<u16>()];
        (point, 0u16..48).prop_map(|(first, span)| {
            let last = first.saturating_add(span);
            RequesterIdRange::new(SourceId(first), SourceId(last)).unwrap()
        })
    }

    proptest! {
        /// Membership agrees with a 65536-entry bitmap of the same ranges, and the normal
        /// form holds: ascending, disjoint, never touching.
        #[test]
        fn set_matches_a_bitmap_model(ranges in prop::collection::vec(any_range(), 0..12), probes in prop::collection::vec(any::<u16>(), 0..64)) {
            let mut model = vec![false; 1 << 16];
            for r in &ranges {
                for id in r.first().0..=r.last().0 {
                    model[usize::from(id)] = true;
                }
            }
            let set = RequesterIdSet::from_ranges(ranges.iter().copied());
            let edges = ranges.iter().flat_map(|r| [r.first().0, r.last().0, r.first().0.wrapping_sub(1), r.last().0.wrapping_add(1)]);
            for id in probes.into_iter().chain(edges).chain([0, u16::MAX]) {
                prop_assert_eq!(set.contains(SourceId(id)), model[usize::from(id)], "id {:#x}", id);
            }
            prop_assert_eq!(set.len() as usize, model.iter().filter(|b| **b).count());
            for pair in set.ranges().windows(2) {
                prop_assert!(u32::from(pair[0].last().0) + 1 < u32::from(pair[1].first().0));
            }
            // Order of the input does not matter.
            let reversed = RequesterIdSet::from_ranges(ranges.iter().rev().copied());
            prop_assert_eq!(reversed, set);
        }

        /// Display and FromStr are inverse.
        #[test]
        fn range_text_round_trips(r in any_range()) {
            prop_assert_eq!(r.to_string().parse::<RequesterIdRange>(), Ok(r));
        }
    }
}
