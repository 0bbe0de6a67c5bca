//! Address generators: turn a [`StreamSpec`] into a sequence of accesses.
//!
//! Every address is aligned to the DMA size, so a DMA never crosses a 4 KiB page and one
//! translation always covers it. Generators are per function and single-owner; random
//! choices come from the function's seeded RNG, so a run is reproducible from its seed.

use std::sync::Arc;

use rand::Rng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};

use super::{Pattern, StreamSpec, Trace};

#[derive(Debug)]
enum Gen {
    Uniform,
    Zipf { dist: Zipf<f64>, pages: u64 },
    Ring,
    Strided { stride: u64 },
    Trace(Arc<Trace>),
}

/// The address stream of one function.
#[derive(Debug)]
pub(crate) struct AddressGen {
    kind: Gen,
    base: u64,
    footprint: u64,
    dma_shift: u32,
    units: u64,
    cursor: u64,
}

impl AddressGen {
    /// A generator for a validated `spec` with DMAs of `dma_bytes` (a power of two).
    pub(crate) fn new(spec: &StreamSpec, dma_bytes: u32) -> Self {
        let dma_shift = dma_bytes.trailing_zeros();
        let kind = match &spec.pattern {
            Pattern::Uniform => Gen::Uniform,
            Pattern::Zipf { exponent } => {
                let pages = (spec.footprint / 4096).max(1);
                // Validated: exponent > 0 and pages >= 1, which is all `Zipf::new` checks.
                match Zipf::new(pages as f64, *exponent) {
                    Ok(dist) => Gen::Zipf { dist, pages },
                    Err(_) => Gen::Uniform,
                }
            }
            Pattern::SequentialRing => Gen::Ring,
            Pattern::Strided { stride } => Gen::Strided { stride: *stride },
            Pattern::Trace(t) => Gen::Trace(t.clone()),
        };
        Self {
            kind,
            base: spec.base,
            footprint: spec.footprint,
            dma_shift,
            units: spec.footprint >> dma_shift,
            cursor: 0,
        }
    }

    /// The next address, and whether the stream itself decides read or write (traces).
    #[inline]
    pub(crate) fn next(&mut self, rng: &mut SmallRng) -> (u64, Option<bool>) {
        match &self.kind {
            Gen::Uniform => (self.base + (rng.random_range(0..self.units) << self.dma_shift), None),
            Gen::Zipf { dist, pages } => {
                let page = (dist.sample(rng) as u64).clamp(1, *pages) - 1;
                let offset = rng.random_range(0..(4096u64 >> self.dma_shift)) << self.dma_shift;
                (self.base + page * 4096 + offset, None)
            }
            Gen::Ring => {
                let unit = self.cursor % self.units;
                self.cursor = self.cursor.wrapping_add(1);
                (self.base + (unit << self.dma_shift), None)
            }
            Gen::Strided { stride } => {
                let off = self.cursor.wrapping_mul(*stride) % self.footprint;
                self.cursor = self.cursor.wrapping_add(1);
                (self.base + off, None)
            }
            Gen::Trace(t) => {
                let a = t.accesses()[(self.cursor % t.len() as u64) as usize];
                self.cursor = self.cursor.wrapping_add(1);
                (a.iova & !((1u64 << self.dma_shift) - 1), Some(a.write))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::workload::TraceAccess;

    fn take(spec: StreamSpec, dma: u32, n: usize) -> Vec<u64> {
        let mut g = AddressGen::new(&spec, dma);
        let mut rng = SmallRng::seed_from_u64(1);
        (0..n).map(|_| g.next(&mut rng).0).collect()
    }

    #[test]
    fn uniform_stays_in_the_footprint_aligned() {
        for a in take(StreamSpec::uniform(0x10_0000, 64 << 10), 256, 2000) {
            assert!((0x10_0000..0x11_0000).contains(&a) && a % 256 == 0, "{a:#x}");
        }
    }

    #[test]
    fn the_ring_walks_buffers_in_order_and_wraps() {
        let spec = StreamSpec { pattern: Pattern::SequentialRing, base: 0x1000, footprint: 4 * 2048 };
        assert_eq!(take(spec, 2048, 6), [0x1000, 0x1800, 0x2000, 0x2800, 0x1000, 0x1800]);
    }

    #[test]
    fn strides_wrap_at_the_footprint() {
        let spec = StreamSpec { pattern: Pattern::Strided { stride: 0x3000 }, base: 0, footprint: 0x8000 };
        assert_eq!(take(spec, 64, 4), [0, 0x3000, 0x6000, 0x1000]);
    }

    #[test]
    fn zipf_prefers_the_first_pages() {
        let spec = StreamSpec { pattern: Pattern::Zipf { exponent: 1.2 }, base: 0x40_0000, footprint: 1024 * 4096 };
        let addrs = take(spec, 64, 20_000);
        assert!(addrs.iter().all(|a| (0x40_0000..0x40_0000 + 1024 * 4096).contains(a) && a % 64 == 0));
        let first = addrs.iter().filter(|&&a| a < 0x40_0000 + 4096).count();
        let last = addrs.iter().filter(|&&a| a >= 0x40_0000 + 1023 * 4096).count();
        assert!(first > 20 * (last + 1), "page 0: {first}, page 1023: {last}");
    }

    #[test]
    fn traces_replay_in_a_loop_with_their_own_directions() {
        let t = Trace::new(vec![TraceAccess { iova: 0x1234, write: true }, TraceAccess { iova: 0x5000, write: false }])
            .expect("trace");
        let spec = StreamSpec { pattern: Pattern::Trace(Arc::new(t)), base: 0, footprint: 0 };
        let mut g = AddressGen::new(&spec, 64);
        let mut rng = SmallRng::seed_from_u64(1);
        let got: Vec<_> = (0..3).map(|_| g.next(&mut rng)).collect();
        assert_eq!(got, [(0x1200, Some(true)), (0x5000, Some(false)), (0x1200, Some(true))]);
    }
}
