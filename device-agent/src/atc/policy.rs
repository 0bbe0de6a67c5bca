//! Eviction policies of the device TLB and the recency order they keep.
//!
//! Owns the choice of a victim when the cache is full: LRU (the default; Linux vhost and
//! DPDK's vhost IOTLB also evict from the cold end), random, and FIFO (for comparison).
//! The order is an intrusive doubly linked list threaded through the cache's slots, so a
//! hit moves an entry with a handful of stores and no allocation. Not the cache's
//! indexing (`atc`).

use std::fmt;
use std::str::FromStr;

/// How a full device TLB picks the entry to drop.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum EvictionPolicy {
    /// Least recently used: every hit moves its entry to the front; the back goes.
    #[default]
    Lru,
    /// A uniformly random entry (no bookkeeping on hits).
    Random,
    /// First in, first out: insertion order; hits do not matter.
    Fifo,
}

impl EvictionPolicy {
    /// Every policy, for tests and help texts.
    pub const ALL: [EvictionPolicy; 3] = [EvictionPolicy::Lru, EvictionPolicy::Random, EvictionPolicy::Fifo];

    /// The policy's name on the command line and in logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            EvictionPolicy::Lru => "lru",
            EvictionPolicy::Random => "random",
            EvictionPolicy::Fifo => "fifo",
        }
    }
}

impl fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not an eviction policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown eviction policy {0:?}: expected lru, random or fifo")]
pub struct ParsePolicyError(String);

impl FromStr for EvictionPolicy {
    type Err = ParsePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|p| p.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| ParsePolicyError(s.to_owned()))
    }
}

/// No slot.
pub(super) const NIL: u32 = u32::MAX;

/// The links of one slot in the order list.
#[derive(Clone, Copy, Debug)]
pub(super) struct Links {
    pub(super) prev: u32,
    pub(super) next: u32,
}

impl Links {
    pub(super) const UNLINKED: Links = Links { prev: NIL, next: NIL };
}

/// Something threaded on the order list.
pub(super) trait Linked {
    fn links(&mut self) -> &mut Links;
}

/// The order list: front = most recently inserted (FIFO) or used (LRU); the victim is at
/// the back.
#[derive(Clone, Copy, Debug)]
pub(super) struct Order {
    head: u32,
    tail: u32,
}

impl Order {
    pub(super) const EMPTY: Order = Order { head: NIL, tail: NIL };

    /// The front slot.
    pub(super) fn front(&self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    /// The back slot: the LRU and FIFO victim.
    pub(super) fn back(&self) -> Option<u32> {
        (self.tail != NIL).then_some(self.tail)
    }

    /// Threads slot `i` (currently unlinked) at the front.
    pub(super) fn push_front<N: Linked>(&mut self, nodes: &mut [N], i: u32) {
        let old = self.head;
        *nodes[i as usize].links() = Links { prev: NIL, next: old };
        if old == NIL {
            self.tail = i;
        } else {
            nodes[old as usize].links().prev = i;
        }
        self.head = i;
    }

    /// Unthreads slot `i`.
    pub(super) fn unlink<N: Linked>(&mut self, nodes: &mut [N], i: u32) {
        let Links { prev, next } = *nodes[i as usize].links();
        if prev == NIL {
            self.head = next;
        } else {
            nodes[prev as usize].links().next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            nodes[next as usize].links().prev = prev;
        }
        *nodes[i as usize].links() = Links::UNLINKED;
    }

    /// Moves slot `i` to the front (an LRU hit).
    #[inline]
    pub(super) fn move_to_front<N: Linked>(&mut self, nodes: &mut [N], i: u32) {
        if self.head != i {
            self.unlink(nodes, i);
            self.push_front(nodes, i);
        }
    }

    /// The slot after `i` (towards the back).
    pub(super) fn next_of<N: Linked>(nodes: &mut [N], i: u32) -> Option<u32> {
        let n = nodes[i as usize].links().next;
        (n != NIL).then_some(n)
    }
}

/// xorshift64*: the random policy's victim picker; cheap and good enough to spread
/// evictions (not for anything that needs real randomness).
#[derive(Clone, Copy, Debug)]
pub(super) struct VictimRng(u64);

impl VictimRng {
    pub(super) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// A value in `0..n` (`n > 0`).
    pub(super) fn below(&mut self, n: u32) -> u32 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((u128::from(r >> 32) * u128::from(n)) >> 32) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct N(Links);
    impl Linked for N {
        fn links(&mut self) -> &mut Links {
            &mut self.0
        }
    }

    fn walk(order: &Order, nodes: &mut [N]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut cur = order.front();
        while let Some(i) = cur {
            out.push(i);
            cur = Order::next_of(nodes, i);
        }
        out
    }

    #[test]
    fn the_order_list_moves_and_unlinks() {
        let mut nodes: Vec<N> = (0..4).map(|_| N(Links::UNLINKED)).collect();
        let mut o = Order::EMPTY;
        for i in 0..4 {
            o.push_front(&mut nodes, i);
        }
        assert_eq!(walk(&o, &mut nodes), [3, 2, 1, 0]);
        o.move_to_front(&mut nodes, 0);
        assert_eq!(walk(&o, &mut nodes), [0, 3, 2, 1]);
        assert_eq!(o.back(), Some(1));
        o.unlink(&mut nodes, 3);
        o.unlink(&mut nodes, 1);
        assert_eq!(walk(&o, &mut nodes), [0, 2]);
        o.unlink(&mut nodes, 0);
        o.unlink(&mut nodes, 2);
        assert_eq!((o.front(), o.back()), (None, None));
    }

    #[test]
    fn policies_parse() {
        for p in EvictionPolicy::ALL {
            assert_eq!(p.to_string().parse::<EvictionPolicy>(), Ok(p));
        }
        assert_eq!("LRU".parse::<EvictionPolicy>(), Ok(EvictionPolicy::Lru));
        assert!("clock".parse::<EvictionPolicy>().is_err());
    }

    #[test]
    fn the_victim_picker_stays_in_range_and_spreads() {
        let mut r = VictimRng::new(7);
        let mut seen = [0u32; 8];
        for _ in 0..8000 {
            seen[r.below(8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 500), "{seen:?}");
    }
}
