//! The address translation cache (ATC, the device TLB) of one emulated PCIe function.
//!
//! Owns the entries and their lookup, insertion, eviction and range invalidation. An entry
//! is a range exactly as a translation completion gave it (a naturally aligned 2^n-byte
//! range with R, W, U), so one 2 MiB completion is one entry. The cache is a plain value
//! with `&mut self` methods: it belongs to its function's state machine and is never
//! shared, so the hit path takes no lock and touches no atomic (target ≤ 20 ns per hit:
//! `docs/BENCHMARKS.md`, `benches/atc.rs`).
//!
//! Indexing: one hash map keyed by (range index, size shift), plus a bit mask of the
//! range sizes present; a lookup probes once per size present (usually one or two).
//! Not here: the wire protocol, outstanding misses and in-flight DMA (`function`).

mod entry;
mod policy;
mod range;

use std::hash::BuildHasherDefault;

pub use entry::{AtcEntry, EntryError, Lookup, Perms};
pub use policy::{EvictionPolicy, ParsePolicyError};
pub use range::InvalidationRange;

use entry::{MAX_SIZE_SHIFT, MIN_SIZE_SHIFT};
use policy::{Linked, Links, Order, VictimRng};

use crate::fasthash::FastMap;

/// Default capacity in entries (Linux vhost and DPDK vhost both default to 2048).
pub(crate) const DEFAULT_CAPACITY: usize = 2048;
/// Largest capacity a function may ask for.
pub(crate) const MAX_CAPACITY: usize = 1 << 24;

type KeyMap = FastMap<u64, u32>;

/// The key of the range of `2^shift` bytes containing `iova`.
#[inline]
const fn key(iova: u64, shift: u32) -> u64 {
    ((iova >> shift) << 6) | shift as u64
}

/// Marks a free slot (no real entry has a shift below 12).
const FREE: u8 = 0;

#[derive(Clone, Copy, Debug)]
struct Slot {
    entry: AtcEntry,
    links: Links,
}

impl Linked for Slot {
    fn links(&mut self) -> &mut Links {
        &mut self.links
    }
}

/// What an insertion did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Inserted {
    /// A new entry in a free slot.
    New,
    /// An entry for the same range was overwritten.
    Replaced,
    /// A new entry, after `0` was evicted to make room.
    Evicted(AtcEntry),
}

/// Why a cache cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("device TLB capacity {0} is outside 1..={MAX_CAPACITY}")]
pub struct InvalidCapacity(pub usize);

/// A bounded device TLB with a choice of eviction policy.
#[derive(Debug, Clone)]
pub struct Atc {
    map: KeyMap,
    slots: Vec<Slot>,
    free: Vec<u32>,
    order: Order,
    policy: EvictionPolicy,
    capacity: usize,
    /// Bit n set: some entry has size shift n.
    shifts: u64,
    per_shift: [u32; 64],
    rng: VictimRng,
}

impl Atc {
    /// An empty cache of `capacity` entries. `seed` drives the random policy.
    pub fn new(capacity: usize, policy: EvictionPolicy, seed: u64) -> Result<Self, InvalidCapacity> {
        if !(1..=MAX_CAPACITY).contains(&capacity) {
            return Err(InvalidCapacity(capacity));
        }
        Ok(Self {
            map: KeyMap::with_capacity_and_hasher(capacity, BuildHasherDefault::default()),
            slots: Vec::with_capacity(capacity.min(1 << 16)),
            free: Vec::new(),
            order: Order::EMPTY,
            policy,
            capacity,
            shifts: 0,
            per_shift: [0; 64],
            rng: VictimRng::new(seed),
        })
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Looks up an access to `iova`, counting as a use for LRU. The hit path: one hash
    /// probe per range size present and, under LRU, a move to the front.
    #[inline]
    pub fn lookup(&mut self, iova: u64, write: bool) -> Lookup {
        let mut sizes = self.shifts;
        while sizes != 0 {
            let shift = sizes.trailing_zeros();
            sizes &= sizes - 1;
            if let Some(&i) = self.map.get(&key(iova, shift)) {
                let e = self.slots[i as usize].entry;
                if self.policy == EvictionPolicy::Lru {
                    self.order.move_to_front(&mut self.slots, i);
                }
                return if !e.perms.allows(write) {
                    Lookup::NoPermission
                } else if e.perms.untranslated_only() {
                    Lookup::Untranslated
                } else {
                    Lookup::Hit { hpa: e.translate(iova), size_shift: e.size_shift }
                };
            }
        }
        Lookup::Miss
    }

    /// The entry covering `iova`, without counting a use.
    #[cfg(test)]
    fn peek(&self, iova: u64) -> Option<AtcEntry> {
        let mut sizes = self.shifts;
        while sizes != 0 {
            let shift = sizes.trailing_zeros();
            sizes &= sizes - 1;
            if let Some(&i) = self.map.get(&key(iova, shift)) {
                return Some(self.slots[i as usize].entry);
            }
        }
        None
    }

    /// Caches `entry`, evicting by policy when full. An entry for the same range is
    /// overwritten (a newer completion wins); under FIFO it keeps its place.
    pub fn insert(&mut self, entry: AtcEntry) -> Inserted {
        let shift = u32::from(entry.size_shift);
        debug_assert!((u32::from(MIN_SIZE_SHIFT)..=u32::from(MAX_SIZE_SHIFT)).contains(&shift));
        let k = key(entry.iova, shift);
        if let Some(&i) = self.map.get(&k) {
            self.slots[i as usize].entry = entry;
            if self.policy == EvictionPolicy::Lru {
                self.order.move_to_front(&mut self.slots, i);
            }
            return Inserted::Replaced;
        }
        let mut outcome = Inserted::New;
        if self.map.len() >= self.capacity {
            let victim = match self.policy {
                EvictionPolicy::Lru | EvictionPolicy::Fifo => self.order.back(),
                // Full: every slot is live, so any index is an entry.
                EvictionPolicy::Random => Some(self.rng.below(self.slots.len() as u32)),
            };
            if let Some(v) = victim {
                outcome = Inserted::Evicted(self.remove_slot(v));
            }
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize].entry = entry;
                i
            }
            None => {
                self.slots.push(Slot { entry, links: Links::UNLINKED });
                (self.slots.len() - 1) as u32
            }
        };
        self.map.insert(k, i);
        self.order.push_front(&mut self.slots, i);
        self.per_shift[shift as usize] += 1;
        self.shifts |= 1 << shift;
        outcome
    }

    fn remove_slot(&mut self, i: u32) -> AtcEntry {
        let e = self.slots[i as usize].entry;
        let shift = u32::from(e.size_shift);
        self.map.remove(&key(e.iova, shift));
        self.order.unlink(&mut self.slots, i);
        self.slots[i as usize].entry.size_shift = FREE;
        self.free.push(i);
        self.per_shift[shift as usize] -= 1;
        if self.per_shift[shift as usize] == 0 {
            self.shifts &= !(1 << shift);
        }
        e
    }

    /// Drops every entry that meets `range`; returns how many. Probes the keys the range
    /// spans when that is cheaper than a scan of the whole cache.
    pub fn invalidate(&mut self, range: InvalidationRange) -> usize {
        let mut probes = 0u64;
        let mut sizes = self.shifts;
        while sizes != 0 {
            let shift = sizes.trailing_zeros();
            sizes &= sizes - 1;
            probes = probes.saturating_add((range.last >> shift) - (range.first >> shift) + 1);
        }
        let mut dropped = 0;
        if probes <= self.map.len() as u64 {
            let mut sizes = self.shifts;
            while sizes != 0 {
                let shift = sizes.trailing_zeros();
                sizes &= sizes - 1;
                for index in (range.first >> shift)..=(range.last >> shift) {
                    if let Some(&i) = self.map.get(&((index << 6) | u64::from(shift))) {
                        self.remove_slot(i);
                        dropped += 1;
                    }
                }
            }
        } else {
            for i in 0..self.slots.len() {
                let e = self.slots[i].entry;
                if e.size_shift != FREE && e.overlaps(range.first, range.last) {
                    self.remove_slot(i as u32);
                    dropped += 1;
                }
            }
        }
        dropped
    }

    /// Drops everything (a link reset); returns how many entries there were.
    pub fn clear(&mut self) -> usize {
        let n = self.map.len();
        self.map.clear();
        self.slots.clear();
        self.free.clear();
        self.order = Order::EMPTY;
        self.shifts = 0;
        self.per_shift = [0; 64];
        n
    }

    /// The entries from the front of the eviction order (most recently used or inserted)
    /// to the back (the next victim under LRU and FIFO).
    pub fn entries(&mut self) -> Vec<AtcEntry> {
        let mut out = Vec::with_capacity(self.len());
        let mut cur = self.order.front();
        while let Some(i) = cur {
            out.push(self.slots[i as usize].entry);
            cur = Order::next_of(&mut self.slots, i);
        }
        out
    }
}

#[cfg(test)]
mod tests;
