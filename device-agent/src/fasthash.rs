//! A multiplicative hasher for the integer keys of per-function tables (device-TLB keys,
//! tags, pages). SipHash resists hash flooding, which these tables never face (their keys
//! come from the function itself), and costs more than the rest of a lookup.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes one `u64` with a multiply and two shifts (SplitMix64's finalizer, halved).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        let x = (n ^ (n >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        self.0 = x ^ (x >> 32);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A hash map with [`KeyHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn nearby_keys_spread_over_buckets() {
        let b = BuildHasherDefault::<KeyHasher>::default();
        let low: std::collections::HashSet<u64> = (0..4096u64).map(|k| b.hash_one(k << 12) & 1023).collect();
        assert!(low.len() > 900, "{} distinct low bits", low.len());
        let top: std::collections::HashSet<u64> = (0..4096u64).map(|k| b.hash_one(k) >> 57).collect();
        assert_eq!(top.len(), 128, "hashbrown's control bytes use the top 7 bits");
    }
}
