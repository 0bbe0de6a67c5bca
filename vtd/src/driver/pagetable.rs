//! Second-stage page tables of one paging domain, kept as real entries in host memory
//! (VT-d 3.6, 9.8), after Linux `__domain_mapping` /
//! `dma_pte_clear_range` / `dma_pte_free_pagetable`.
//!
//! This module owns the table walk on the software side: choosing 4 KiB, 2 MiB or 1 GiB
//! leaves, allocating intermediate tables on map (and counting, without writing, how many
//! a map would allocate), clearing leaves and retiring tables that became empty on unmap,
//! the count of table frames linked into the tree, and a software lookup. It does not
//! validate requests (that is `driver`), does not lock (the caller holds the domain's
//! lock), and does not invalidate: it reports what it changed, and the caller flushes and
//! only then frees the retired frames.

use super::Perm;
use super::error::DriverError;
use super::frames::FrameAllocator;
use crate::ids::{Hpa, Iova, PAGE_SIZE};
use crate::unit::memory::{HostMemory, MemoryError};
use crate::unit::tables::{AddressWidth, SlPte, level_index, level_shift};

/// Entries per table (VT-d 3.6: 9 address bits per level).
const ENTRIES: u64 = 512;

/// Bytes mapped by one entry at `level` (1 = 4 KiB).
const fn level_size(level: u32) -> u64 {
    1u64 << level_shift(level)
}

/// Address of the entry for `iova` in the table at `table`, which sits at `level`.
fn entry_addr(table: Hpa, iova: u64, level: u32) -> Hpa {
    Hpa(table.0 + level_index(Iova(iova), level) * 8)
}

/// A present entry ends the walk at level 1, or where PS is set (levels 2 and 3).
fn is_leaf(pte: SlPte, level: u32) -> bool {
    level == 1 || pte.superpage()
}

/// Whether a map places a superpage leaf at `level` for `iova` (to `hpa`, with `remaining`
/// bytes of the range left from `iova`) instead of descending to a smaller one.
///
/// VT-d 3.6.1 / 9.8: PS=1 at level 2 maps 2 MiB, at level 3 1 GiB; the input address, the
/// output address and the rest of the range must all be aligned to it, and the unit must
/// support the size (CAP.SSLPS, `max_leaf_level`).
fn superpage_fits(level: u32, max_leaf_level: u32, iova: u64, hpa: u64, remaining: u64) -> bool {
    let size = level_size(level);
    level <= max_leaf_level && iova.is_multiple_of(size) && hpa.is_multiple_of(size) && remaining >= size
}

/// One map request as the leaf choice sees it: `[iova, end)` to `hpa` with leaves up to
/// `max_leaf_level`.
#[derive(Clone, Copy, Debug)]
struct MapShape {
    iova: u64,
    hpa: u64,
    end: u64,
    max_leaf_level: u32,
}

impl MapShape {
    /// Whether the map places a superpage at `level` for `at` (see [`superpage_fits`]).
    fn superpage_at(&self, level: u32, at: u64) -> bool {
        superpage_fits(level, self.max_leaf_level, at, self.hpa + (at - self.iova), self.end - at)
    }
}

/// What an unmap changed, for the invalidation that must follow.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) struct UnmapOutcome {
    /// Bytes of leaf mappings cleared.
    pub(crate) bytes: u64,
    /// `[first, end)` covering every cleared leaf and the part of the range inside every
    /// retired table's span; `None` when nothing was written.
    pub(crate) span: Option<(u64, u64)>,
    /// Page-table pages unlinked from the tree (their frames are in the caller's list).
    pub(crate) tables_freed: usize,
    /// `[first, end)` covering the whole span of every retired table: until the
    /// paging-structure caches are invalidated, a walk anywhere in it may still go through
    /// a retired table, so a deferred flush must come before anything is mapped there.
    pub(crate) table_span: Option<(u64, u64)>,
}

fn union(span: Option<(u64, u64)>, start: u64, end: u64) -> Option<(u64, u64)> {
    Some(match span {
        None => (start, end),
        Some((s, e)) => (s.min(start), e.max(end)),
    })
}

impl UnmapOutcome {
    fn touch(&mut self, start: u64, end: u64) {
        self.span = union(self.span, start, end);
    }

    /// Everything whose translation may be stale until the flush: the leaves and the
    /// retired tables' spans.
    pub(crate) fn stale_span(&self) -> Option<(u64, u64)> {
        match (self.span, self.table_span) {
            (Some((s, e)), t) => union(t, s, e),
            (None, t) => t,
        }
    }
}

/// The page-table tree of one paging domain.
#[derive(Debug)]
pub(crate) struct PageTable {
    top: Hpa,
    aw: AddressWidth,
    /// Table frames linked into the tree, the top included (retired ones are the caller's).
    frames: usize,
}

impl PageTable {
    /// A tree with an empty top-level table.
    pub(crate) fn new(frames: &FrameAllocator, aw: AddressWidth) -> Result<Self, DriverError> {
        Ok(Self { top: frames.alloc()?, aw, frames: 1 })
    }

    /// Table frames linked into the tree, the top-level table included: what the domain
    /// holds besides the tables its unmaps retired and have not been freed yet.
    pub(crate) fn frames(&self) -> usize {
        self.frames
    }

    /// How many table frames [`Self::map`] of `[iova, iova + len)` to `hpa` would allocate,
    /// counted by the same leaf choices without writing anything. The caller has checked
    /// that the range is unmapped (over a mapped page the map fails, whatever this says).
    pub(crate) fn frames_needed(
        &self,
        mem: &HostMemory,
        iova: u64,
        hpa: u64,
        len: u64,
        max_leaf_level: u32,
    ) -> Result<usize, MemoryError> {
        let shape = MapShape { iova, hpa, end: iova + len, max_leaf_level };
        needed_in(mem, Some(self.top), self.aw.levels(), iova, shape.end, &shape)
    }

    /// The top-level table (the context entry's SLPTPTR).
    pub(crate) fn top(&self) -> Hpa {
        self.top
    }

    /// The first mapped address in `[start, end)`, if any.
    pub(crate) fn first_mapped(&self, mem: &HostMemory, start: u64, end: u64) -> Result<Option<u64>, MemoryError> {
        first_mapped_in(mem, self.top, self.aw.levels(), start, end)
    }

    /// Maps `[iova, iova + len)` to `[hpa, hpa + len)` with `perm`, using leaves up to
    /// `max_leaf_level` (1: 4 KiB only, 2: also 2 MiB, 3: also 1 GiB; VT-d CAP.SSLPS).
    ///
    /// The caller has validated the arguments and checked that the range is unmapped. On
    /// error, `[iova, iova + len)` may be partly mapped and may hold empty tables: the
    /// caller rolls back by unmapping the whole range.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn map(
        &mut self,
        mem: &HostMemory,
        frames: &FrameAllocator,
        iova: u64,
        hpa: u64,
        len: u64,
        perm: Perm,
        max_leaf_level: u32,
    ) -> Result<(), DriverError> {
        let shape = MapShape { iova, hpa, end: iova + len, max_leaf_level };
        let mut cur = iova;
        while cur < shape.end {
            cur += self.map_chunk(mem, frames, cur, perm, &shape)?;
        }
        Ok(())
    }

    /// Maps one leaf (or a run of 4 KiB leaves in one last-level table) at `iova`, walking
    /// from the top. Returns the bytes mapped.
    fn map_chunk(
        &mut self,
        mem: &HostMemory,
        frames: &FrameAllocator,
        iova: u64,
        perm: Perm,
        shape: &MapShape,
    ) -> Result<u64, DriverError> {
        let hpa = shape.hpa + (iova - shape.iova);
        let remaining = shape.end - iova;
        let mut table = self.top;
        let mut level = self.aw.levels();
        while level > 1 {
            let slot = entry_addr(table, iova, level);
            let pte = SlPte(mem.read_u64(slot)?);
            if !pte.present() {
                if shape.superpage_at(level, iova) {
                    let leaf = SlPte::leaf(Hpa(hpa), perm.read, perm.write, true);
                    mem.write_u64(slot, leaf.to_bits())?;
                    return Ok(level_size(level));
                }
                let next = frames.alloc()?;
                // The zeroed table is complete before the entry that publishes it is
                // written (release store in `write_u64`).
                if let Err(e) = mem.write_u64(slot, SlPte::table(next).to_bits()) {
                    frames.free(next);
                    return Err(e.into());
                }
                self.frames += 1;
                table = next;
            } else if pte.superpage() {
                return Err(DriverError::Overlap { iova: Iova(iova) });
            } else {
                // An existing table (possibly empty inside this range): descend, even
                // where a superpage would fit, rather than replace a table the hardware
                // may have cached (that would need a flush before the map).
                table = pte.addr();
            }
            level -= 1;
        }
        // Level 1: fill the run of 4 KiB entries this table holds for the range.
        let first = level_index(Iova(iova), 1);
        let count = (ENTRIES - first).min(remaining / PAGE_SIZE);
        for i in 0..count {
            let slot = Hpa(table.0 + (first + i) * 8);
            if SlPte(mem.read_u64(slot)?).present() {
                return Err(DriverError::Overlap { iova: Iova(iova + i * PAGE_SIZE) });
            }
            let leaf = SlPte::leaf(Hpa(hpa + i * PAGE_SIZE), perm.read, perm.write, false);
            mem.write_u64(slot, leaf.to_bits())?;
        }
        Ok(count * PAGE_SIZE)
    }

    /// The leaf that maps `iova`: its level and entry.
    fn leaf_at(&self, mem: &HostMemory, iova: u64) -> Result<Option<(u32, SlPte)>, MemoryError> {
        let mut table = self.top;
        let mut level = self.aw.levels();
        loop {
            let pte = SlPte(mem.read_u64(entry_addr(table, iova, level))?);
            if !pte.present() {
                return Ok(None);
            }
            if is_leaf(pte, level) {
                return Ok(Some((level, pte)));
            }
            if level == 1 {
                return Ok(None);
            }
            table = pte.addr();
            level -= 1;
        }
    }

    /// Refuses an unmap of `[start, end)` that would cut a superpage: only the leaves at
    /// the two ends of the range can be partly covered.
    pub(crate) fn check_unmap(&self, mem: &HostMemory, start: u64, end: u64) -> Result<(), DriverError> {
        for probe in [start, end - 1] {
            if let Some((level, pte)) = self.leaf_at(mem, probe)? {
                let size = level_size(level);
                let base = probe & !(size - 1);
                if pte.superpage() && (base < start || base + size > end) {
                    return Err(DriverError::PartialSuperpage { iova: Iova(base) });
                }
            }
        }
        Ok(())
    }

    /// Clears every leaf inside `[start, end)` and unlinks tables that became empty,
    /// pushing their frames onto `retired` (to be freed after the invalidation). The
    /// caller has run [`Self::check_unmap`]; the top-level table is never retired.
    pub(crate) fn unmap(
        &mut self,
        mem: &HostMemory,
        start: u64,
        end: u64,
        retired: &mut Vec<Hpa>,
    ) -> Result<UnmapOutcome, DriverError> {
        let mut out = UnmapOutcome::default();
        let result = unmap_in(mem, self.top, self.aw.levels(), start, end, retired, &mut out);
        // Count what was unlinked even if the walk stopped part way.
        self.frames = self.frames.saturating_sub(out.tables_freed);
        result.map(|()| out)
    }

    /// Software walk: the host address `iova` maps to, its permissions and the size of
    /// the page that maps it.
    pub(crate) fn lookup(&self, mem: &HostMemory, iova: u64) -> Option<(Hpa, Perm, u64)> {
        let (level, pte) = self.leaf_at(mem, iova).ok()??;
        let size = level_size(level);
        let perm = Perm { read: pte.readable(), write: pte.writable() };
        Some((Hpa(pte.addr().0 + (iova & (size - 1))), perm, size))
    }

    /// Every table frame of the tree, top included (for destroying the domain).
    pub(crate) fn collect_frames(&self, mem: &HostMemory, out: &mut Vec<Hpa>) {
        collect_in(mem, self.top, self.aw.levels(), out);
    }
}

fn first_mapped_in(mem: &HostMemory, table: Hpa, level: u32, start: u64, end: u64) -> Result<Option<u64>, MemoryError> {
    let size = level_size(level);
    let mut a = start;
    while a < end {
        let chunk_end = ((a & !(size - 1)) + size).min(end);
        let pte = SlPte(mem.read_u64(entry_addr(table, a, level))?);
        if pte.present() {
            if is_leaf(pte, level) {
                return Ok(Some(a));
            }
            if let Some(found) = first_mapped_in(mem, pte.addr(), level - 1, a, chunk_end)? {
                return Ok(Some(found));
            }
        }
        a = chunk_end;
    }
    Ok(None)
}

/// The tables a map of `[start, end)` allocates below `table` (a table at `level`; `None`
/// for one the map itself would allocate, so still empty), making the choices
/// [`PageTable::map_chunk`] makes.
fn needed_in(
    mem: &HostMemory,
    table: Option<Hpa>,
    level: u32,
    start: u64,
    end: u64,
    shape: &MapShape,
) -> Result<usize, MemoryError> {
    if level == 1 {
        return Ok(0);
    }
    let size = level_size(level);
    let mut needed = 0;
    let mut a = start;
    while a < end {
        let chunk_end = ((a & !(size - 1)) + size).min(end);
        let pte = match table {
            Some(t) => SlPte(mem.read_u64(entry_addr(t, a, level))?),
            None => SlPte(0),
        };
        if !pte.present() {
            if !shape.superpage_at(level, a) {
                needed += 1 + needed_in(mem, None, level - 1, a, chunk_end, shape)?;
            }
        } else if !pte.superpage() {
            needed += needed_in(mem, Some(pte.addr()), level - 1, a, chunk_end, shape)?;
        }
        // A present superpage: the map fails with an overlap and allocates nothing here.
        a = chunk_end;
    }
    Ok(needed)
}

fn unmap_in(
    mem: &HostMemory,
    table: Hpa,
    level: u32,
    start: u64,
    end: u64,
    retired: &mut Vec<Hpa>,
    out: &mut UnmapOutcome,
) -> Result<(), DriverError> {
    let size = level_size(level);
    let mut a = start;
    while a < end {
        let base = a & !(size - 1);
        let chunk_end = (base + size).min(end);
        let slot = entry_addr(table, a, level);
        let pte = SlPte(mem.read_u64(slot)?);
        if pte.present() {
            let covered = a == base && chunk_end == base + size;
            if is_leaf(pte, level) {
                if !covered {
                    return Err(DriverError::PartialSuperpage { iova: Iova(base) });
                }
                mem.write_u64(slot, 0)?;
                out.touch(base, base + size);
                out.bytes += size;
            } else {
                let child = pte.addr();
                unmap_in(mem, child, level - 1, a, chunk_end, retired, out)?;
                // A child whose whole span was in the range is empty now; otherwise look,
                // starting right after the cleared part (where a live entry usually is).
                let next = level_index(Iova(chunk_end), level - 1);
                if covered || table_is_empty(mem, child, next)? {
                    // Linux dma_pte_clear_level + dma_pte_list_pagetables: unlink, and
                    // free only after the flush (IH=0 drops paging-structure caches).
                    mem.write_u64(slot, 0)?;
                    retired.push(child);
                    // The flush covers the part of the range inside this table's span:
                    // VT-d 6.5.1.2, a page-selective flush with IH=0 drops the
                    // paging-structure entries used to translate that range, including
                    // the one pointing at this table.
                    out.touch(a, chunk_end);
                    out.tables_freed += 1;
                    out.table_span = union(out.table_span, base, base.saturating_add(size));
                }
            }
        }
        a = chunk_end;
    }
    Ok(())
}

/// Whether every entry of `table` is zero, looking at entry `from` first and going round:
/// after clearing part of a table, the entries next to the cleared run are the likeliest
/// to be live, so a table that is not empty is usually proven so in one or two loads
/// instead of a scan from index 0 (which costs up to 512 loads per 4 KiB unmap when pages
/// are unmapped in address order).
fn table_is_empty(mem: &HostMemory, table: Hpa, from: u64) -> Result<bool, MemoryError> {
    for k in 0..ENTRIES {
        let i = (from + k) % ENTRIES;
        if mem.read_u64(Hpa(table.0 + i * 8))? != 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn collect_in(mem: &HostMemory, table: Hpa, level: u32, out: &mut Vec<Hpa>) {
    out.push(table);
    if level == 1 {
        return;
    }
    for i in 0..ENTRIES {
        let Ok(bits) = mem.read_u64(Hpa(table.0 + i * 8)) else {
            continue;
        };
        let pte = SlPte(bits);
        if pte.present() && !is_leaf(pte, level) {
            collect_in(mem, pte.addr(), level - 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const RW: Perm = Perm { read: true, write: true };
    const RO: Perm = Perm { read: true, write: false };

    struct Fixture {
        mem: Arc<HostMemory>,
        frames: FrameAllocator,
        pt: PageTable,
    }

    impl Fixture {
        fn new(aw: AddressWidth) -> Self {
            let mem = Arc::new(HostMemory::new(8 * GIB).unwrap());
            let frames = FrameAllocator::new(mem.clone(), Hpa(8 * GIB - 64 * MIB), 64 * MIB).unwrap();
            let pt = PageTable::new(&frames, aw).unwrap();
            Self { mem, frames, pt }
        }
        /// Maps, checking that the dry-run count matches what the map allocated.
        fn map(&mut self, iova: u64, hpa: u64, len: u64, perm: Perm, max_leaf: u32) -> Result<(), DriverError> {
            let needed = self.pt.frames_needed(&self.mem, iova, hpa, len, max_leaf).unwrap();
            let before = self.frames.in_use();
            let result = self.pt.map(&self.mem, &self.frames, iova, hpa, len, perm, max_leaf);
            if result.is_ok() {
                assert_eq!(self.frames.in_use() - before, needed, "map of {iova:#x}+{len:#x} to {hpa:#x}");
            }
            assert_eq!(self.pt.frames(), self.frames.in_use());
            result
        }
        fn unmap(&mut self, start: u64, end: u64) -> Result<UnmapOutcome, DriverError> {
            self.pt.check_unmap(&self.mem, start, end)?;
            let mut retired = Vec::new();
            let out = self.pt.unmap(&self.mem, start, end, &mut retired)?;
            assert_eq!(retired.len(), out.tables_freed);
            self.frames.free_all(retired);
            assert_eq!(self.pt.frames(), self.frames.in_use());
            Ok(out)
        }
        fn lookup(&self, iova: u64) -> Option<(Hpa, Perm, u64)> {
            self.pt.lookup(&self.mem, iova)
        }
    }

    #[test]
    fn picks_the_largest_aligned_leaf() {
        let mut f = Fixture::new(AddressWidth::Aw48);
        // 1 GiB + 2 MiB + 4 KiB, all aligned: one of each.
        f.map(GIB, 2 * GIB, GIB + 2 * MIB + 4096, RW, 3).unwrap();
        assert_eq!(f.lookup(GIB + 5), Some((Hpa(2 * GIB + 5), RW, GIB)));
        assert_eq!(f.lookup(2 * GIB + 7), Some((Hpa(3 * GIB + 7), RW, 2 * MIB)));
        assert_eq!(f.lookup(2 * GIB + 2 * MIB), Some((Hpa(3 * GIB + 2 * MIB), RW, 4096)));
        assert_eq!(f.lookup(2 * GIB + 2 * MIB + 4096), None);
        // top + L3 + L2 (for the 2M and 4K) + L1 (for the 4K)
        assert_eq!(f.frames.in_use(), 4);
        // hpa misaligned for superpages: all 4 KiB.
        f.map(4 * GIB, 4096, 2 * MIB, RW, 3).unwrap();
        assert_eq!(f.lookup(4 * GIB), Some((Hpa(4096), RW, 4096)));
        assert_eq!(f.lookup(4 * GIB + 2 * MIB - 1).map(|l| l.2), Some(4096));
        // superpages not supported by the unit: 4 KiB.
        f.map(8 * GIB, 0, 2 * MIB, RO, 1).unwrap();
        assert_eq!(f.lookup(8 * GIB + 2 * MIB - 1), Some((Hpa(2 * MIB - 1), RO, 4096)));
        // 2 MiB allowed but not 1 GiB.
        f.map(16 * GIB, 0, GIB, RW, 2).unwrap();
        assert_eq!(f.lookup(16 * GIB).map(|l| l.2), Some(2 * MIB));
    }

    #[test]
    fn finds_overlaps_inside_superpages_and_tables() {
        let mut f = Fixture::new(AddressWidth::Aw39);
        f.map(2 * MIB, 0, 2 * MIB, RW, 3).unwrap();
        f.map(8 * MIB + 0x5000, 0, 4096, RW, 3).unwrap();
        let first = |f: &Fixture, s: u64, e: u64| f.pt.first_mapped(&f.mem, s, e).unwrap();
        assert_eq!(first(&f, 0, 2 * MIB), None);
        assert_eq!(first(&f, 0, 2 * MIB + 4096), Some(2 * MIB));
        assert_eq!(first(&f, 3 * MIB, 9 * MIB), Some(3 * MIB));
        assert_eq!(first(&f, 4 * MIB, 9 * MIB), Some(8 * MIB + 0x5000));
        assert_eq!(first(&f, 8 * MIB + 0x6000, GIB), None);
        // mapping onto an existing page is refused by the walk as well
        assert_eq!(f.map(8 * MIB, 0, 2 * MIB, RW, 3), Err(DriverError::Overlap { iova: Iova(8 * MIB + 0x5000) }));
    }

    #[test]
    fn unmap_refuses_to_split_superpages() {
        let mut f = Fixture::new(AddressWidth::Aw48);
        f.map(GIB, 0, GIB, RW, 3).unwrap();
        f.map(2 * GIB, 0, 2 * MIB, RW, 3).unwrap();
        assert_eq!(f.unmap(GIB + 4096, GIB + 8192), Err(DriverError::PartialSuperpage { iova: Iova(GIB) }));
        assert_eq!(f.unmap(0, GIB + 4096), Err(DriverError::PartialSuperpage { iova: Iova(GIB) }));
        assert_eq!(f.unmap(2 * GIB + 4096, 3 * GIB), Err(DriverError::PartialSuperpage { iova: Iova(2 * GIB) }));
        assert!(f.lookup(GIB).is_some() && f.lookup(2 * GIB).is_some());
        // whole superpages, with holes around them, are fine
        let out = f.unmap(0, 4 * GIB).unwrap();
        assert_eq!(out.bytes, GIB + 2 * MIB);
        assert_eq!(f.lookup(GIB), None);
    }

    #[test]
    fn unmap_retires_empty_tables_and_reports_the_span() {
        let mut f = Fixture::new(AddressWidth::Aw57);
        let base = (1u64 << 57) - 4 * MIB; // near the top of the width
        f.map(base, 0x1000, 3 * 4096, RW, 3).unwrap();
        f.map(base + 2 * MIB, 0, 4096, RW, 3).unwrap();
        let tables = f.frames.in_use();
        assert_eq!(tables, 1 + 4 + 1); // top, L4, L3, L2, L1 x2
        let out = f.unmap(base + 4096, base + 2 * 4096).unwrap();
        assert_eq!((out.bytes, out.tables_freed), (4096, 0));
        assert_eq!(out.span, Some((base + 4096, base + 2 * 4096)));
        assert_eq!((out.table_span, out.stale_span()), (None, out.span));
        let out = f.unmap(base, base + 2 * MIB).unwrap();
        assert_eq!((out.bytes, out.tables_freed), (2 * 4096, 1));
        assert_eq!(out.span, Some((base, base + 2 * MIB)));
        assert_eq!(out.table_span, Some((base, base + 2 * MIB)));
        let out = f.unmap(base + 2 * MIB, base + 2 * MIB + 4096).unwrap();
        assert_eq!((out.bytes, out.tables_freed), (4096, 4));
        assert_eq!(out.span, Some((base + 2 * MIB, base + 2 * MIB + 4096)));
        // the L4 table went too: its whole 256 TiB span may be cached until the flush
        let top = 1u64 << 57;
        assert_eq!(out.table_span, Some((top - (1 << 48), top)));
        assert_eq!(out.stale_span(), out.table_span);
        assert_eq!(f.frames.in_use(), 1, "only the top table is left");
        f.map(base + 2 * MIB, 0, 4096, RW, 3).unwrap();
        let out = f.unmap(base, 1 << 57).unwrap();
        assert_eq!((out.bytes, out.tables_freed), (4096, 4));
        assert_eq!(f.frames.in_use(), 1, "only the top table is left");
        // nothing left: unmapping holes changes nothing
        let out = f.unmap(0, 1 << 57).unwrap();
        assert_eq!(out, UnmapOutcome::default());
    }

    #[test]
    fn counts_the_frames_a_map_needs_without_writing() {
        let mut f = Fixture::new(AddressWidth::Aw48);
        let needed = |f: &Fixture, iova: u64, hpa: u64, len: u64, max_leaf: u32| {
            f.pt.frames_needed(&f.mem, iova, hpa, len, max_leaf).unwrap()
        };
        // an empty tree: L3 + L2 + L1 for one page, nothing written by the count
        assert_eq!(needed(&f, 0, 0, 4096, 3), 3);
        assert_eq!(f.frames.in_use(), 1);
        assert_eq!(f.pt.first_mapped(&f.mem, 0, 1 << 48).unwrap(), None);
        // one 1 GiB leaf: only the L3 table
        assert_eq!(needed(&f, GIB, GIB, GIB, 3), 1);
        // without superpages: L3, L2 and 512 L1 tables
        assert_eq!(needed(&f, GIB, GIB, GIB, 1), 2 + 512);
        // 4 KiB pages straddling a 2 MiB boundary: two L1 tables
        assert_eq!(needed(&f, 2 * MIB - 4096, 0, 2 * 4096, 3), 2 + 2);
        f.map(0, 0, 4096, RW, 3).unwrap();
        // the tables are there now: the neighbour needs none, the far side of the
        // boundary one L1
        assert_eq!(needed(&f, 4096, 0, 4096, 3), 0);
        assert_eq!(needed(&f, 2 * MIB - 4096, 0, 2 * 4096, 3), 1);
        assert_eq!(needed(&f, 512 * GIB, 0, 4096, 3), 3);
    }

    proptest::proptest! {
        /// The dry-run count and the frames a map allocates agree, whatever the tree holds
        /// (checked inside `Fixture::map`).
        #[test]
        fn the_count_matches_the_map(
            maps in proptest::collection::vec((0u64..64, 0u64..8, 1u64..1100, 1u32..=3), 1..12),
        ) {
            let mut f = Fixture::new(AddressWidth::Aw48);
            for (slot, hpa_pages, pages, max_leaf) in maps {
                // iovas on 2 MiB + 1 GiB boundaries, lengths across them
                let iova = (slot % 8) * GIB + (slot / 8) * 2 * MIB + if slot % 3 == 0 { 0 } else { 4096 * slot };
                let _ = f.map(iova, hpa_pages * 2 * MIB, pages * 4096 * (1 + u64::from(max_leaf == 3) * 511), RW, max_leaf);
            }
        }
    }

    #[test]
    fn collects_every_frame() {
        let mut f = Fixture::new(AddressWidth::Aw39);
        f.map(0, 0, 4 * MIB + 4096, RW, 3).unwrap();
        f.map(100 * GIB, 0, GIB, RW, 3).unwrap();
        let mut frames = Vec::new();
        f.pt.collect_frames(&f.mem, &mut frames);
        assert_eq!(frames.len(), f.frames.in_use());
    }
}
