//! The table-frame allocator: hands out zeroed 4 KiB frames for root, context and page
//! tables from a region of host memory reserved for the driver.
//!
//! It owns the region's bookkeeping (a bump pointer plus a free list, so freed frames are
//! reused before new ones are touched) and nothing else: which frame holds which table, and
//! when a frame may be freed (only after the invalidation that makes the hardware forget
//! it, Linux `iommu_put_pages_list` after the flush), is the caller's business.

use std::sync::Arc;

use parking_lot::Mutex;

use super::error::DriverError;
use crate::ids::{Hpa, PAGE_SIZE};
use crate::unit::memory::HostMemory;

#[derive(Debug)]
struct FrameState {
    /// Offset of the first never-used frame in the region.
    next: u64,
    /// Frames freed and ready for reuse (zeroed again when handed out).
    free: Vec<Hpa>,
    /// Frames handed out and not yet returned.
    in_use: usize,
}

/// Allocator of zeroed 4 KiB table frames from a fixed region.
#[derive(Debug)]
pub(crate) struct FrameAllocator {
    memory: Arc<HostMemory>,
    base: Hpa,
    len: u64,
    state: Mutex<FrameState>,
}

impl FrameAllocator {
    /// Manages `[base, base + len)`, which must be page aligned, non-empty and inside
    /// `memory`.
    pub(crate) fn new(memory: Arc<HostMemory>, base: Hpa, len: u64) -> Result<Self, DriverError> {
        let inside = base.0.checked_add(len).is_some_and(|end| end <= memory.size());
        if len == 0 || !base.is_page_aligned() || !len.is_multiple_of(PAGE_SIZE) || !inside {
            return Err(DriverError::InvalidTableRegion { base, len });
        }
        Ok(Self { memory, base, len, state: Mutex::new(FrameState { next: 0, free: Vec::new(), in_use: 0 }) })
    }

    /// A zeroed frame, or [`DriverError::OutOfTableMemory`].
    pub(crate) fn alloc(&self) -> Result<Hpa, DriverError> {
        let frame = {
            let mut s = self.state.lock();
            let frame = if let Some(f) = s.free.pop() {
                f
            } else if s.next < self.len {
                let f = Hpa(self.base.0 + s.next);
                s.next += PAGE_SIZE;
                f
            } else {
                return Err(DriverError::OutOfTableMemory);
            };
            s.in_use += 1;
            frame
        };
        // Zeroing outside the lock: nobody else can see this frame yet. A frame that was
        // never written costs nothing here (the memory is sparse).
        if let Err(e) = self.memory.zero(frame, PAGE_SIZE) {
            self.free(frame);
            return Err(e.into());
        }
        Ok(frame)
    }

    /// Returns one frame. The caller guarantees the hardware no longer references it.
    pub(crate) fn free(&self, frame: Hpa) {
        self.free_all(std::iter::once(frame));
    }

    /// Returns frames in bulk (after the invalidation that retired them).
    pub(crate) fn free_all(&self, frames: impl IntoIterator<Item = Hpa>) {
        let mut s = self.state.lock();
        for f in frames {
            debug_assert!(self.contains(f, PAGE_SIZE), "foreign frame {f}");
            s.free.push(f);
            s.in_use = s.in_use.saturating_sub(1);
        }
    }

    /// True when `[hpa, hpa + len)` overlaps the region.
    pub(crate) fn contains(&self, hpa: Hpa, len: u64) -> bool {
        let end = hpa.0.saturating_add(len);
        hpa.0 < self.base.0 + self.len && end > self.base.0
    }

    /// Frames currently handed out.
    pub(crate) fn in_use(&self) -> usize {
        self.state.lock().in_use
    }

    /// The region `(base, len)`.
    pub(crate) fn region(&self) -> (Hpa, u64) {
        (self.base, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Arc<HostMemory> {
        Arc::new(HostMemory::new(4 << 20).unwrap())
    }

    #[test]
    fn rejects_bad_regions() {
        let m = memory();
        for (base, len) in [(0, 0), (0x800, 0x1000), (0, 0x1800), (4 << 20, 0x1000), (!0xfff, 0x2000)] {
            assert!(matches!(
                FrameAllocator::new(m.clone(), Hpa(base), len),
                Err(DriverError::InvalidTableRegion { .. })
            ));
        }
    }

    #[test]
    fn hands_out_zeroed_frames_and_reuses_freed_ones() {
        let m = memory();
        let a = FrameAllocator::new(m.clone(), Hpa(0x10_0000), 2 * PAGE_SIZE).unwrap();
        let f1 = a.alloc().unwrap();
        let f2 = a.alloc().unwrap();
        assert_ne!(f1, f2);
        assert_eq!(a.alloc(), Err(DriverError::OutOfTableMemory));
        assert_eq!(a.in_use(), 2);
        m.write_u64(Hpa(f1.0 + 8), 0xdead).unwrap();
        a.free(f1);
        let again = a.alloc().unwrap();
        assert_eq!(again, f1);
        assert_eq!(m.read_u64(Hpa(f1.0 + 8)).unwrap(), 0, "reused frame is zeroed");
        assert!(a.contains(Hpa(0x10_1000), 1));
        assert!(a.contains(Hpa(0xf_f000), 0x2000));
        assert!(!a.contains(Hpa(0xf_f000), 0x1000));
        assert!(!a.contains(Hpa(0x10_2000), 0x1000));
    }
}
