//! Emulated host physical memory.
//!
//! Owns the bytes every table and every DMA buffer lives in. It is sparse: the address
//! space is split into 2 MiB chunks of 4 KiB pages, and a page costs memory only once it is
//! written. Reads of a page never written return zeros without allocating. Every 64-bit word
//! is an `AtomicU64`, so a page walk is a chain of real, lock-free loads, and software that
//! rewrites an entry concurrently is seen at word granularity, as on a real memory bus.
//!
//! It does not know what the bytes mean: table formats live in `tables`, policy in the
//! unit and the driver.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ids::{Hpa, PAGE_SHIFT, PAGE_SIZE};

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;
const PAGES_PER_CHUNK: usize = 512;
const CHUNK_SHIFT: u32 = PAGE_SHIFT + 9;

/// Smallest supported memory size (one chunk).
pub const MIN_MEMORY_SIZE: u64 = 1 << CHUNK_SHIFT;
/// Largest supported memory size (1 TiB of address space).
pub const MAX_MEMORY_SIZE: u64 = 1 << 40;
/// Default size: 4 GiB of address space.
pub const DEFAULT_MEMORY_SIZE: u64 = 4 << 30;

type Page = [AtomicU64; WORDS_PER_PAGE];
type Chunk = [OnceLock<Box<Page>>; PAGES_PER_CHUNK];

/// Why a memory access failed: the host bus would answer with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// The access reaches past the end of the emulated memory.
    #[error("host address {addr} (+{len} bytes) is outside the {size:#x}-byte memory")]
    OutOfRange {
        /// First byte of the access.
        addr: Hpa,
        /// Length of the access.
        len: u64,
        /// Configured memory size.
        size: u64,
    },
    /// A word access that is not 8-byte aligned.
    #[error("host address {0} is not 8-byte aligned")]
    Misaligned(Hpa),
}

/// Why a memory size cannot be configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("memory size {0:#x} must be a multiple of 2 MiB between 2 MiB and 1 TiB")]
pub struct InvalidMemorySize(pub u64);

/// Sparse, word-atomic host physical memory.
pub struct HostMemory {
    size: u64,
    chunks: Box<[OnceLock<Box<Chunk>>]>,
}

impl std::fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMemory").field("size", &self.size).field("resident_pages", &self.resident_pages()).finish()
    }
}

/// One 64-bit word a byte range touches.
struct Word {
    /// The word's address (8-byte aligned).
    addr: u64,
    /// The range's first byte inside the word.
    skip: usize,
    /// How many of the word's bytes the range covers.
    take: usize,
    /// How many bytes of the range come before this word.
    done: usize,
}

/// The words `len` bytes from `addr` touch, in address order.
#[inline]
fn words(addr: u64, len: usize) -> impl Iterator<Item = Word> {
    let (mut a, mut done) = (addr, 0);
    std::iter::from_fn(move || {
        (done < len).then(|| {
            let word = a & !7;
            let skip = (a - word) as usize;
            let take = (8 - skip).min(len - done);
            let w = Word { addr: word, skip, take, done };
            done += take;
            a += take as u64;
            w
        })
    })
}

/// The index in its page of the word at `addr`.
#[inline]
const fn word_index(addr: u64) -> usize {
    ((addr & (PAGE_SIZE - 1)) >> 3) as usize
}

impl HostMemory {
    /// Creates a memory of `size` bytes of address space; nothing is allocated until written.
    pub fn new(size: u64) -> Result<Self, InvalidMemorySize> {
        if !(MIN_MEMORY_SIZE..=MAX_MEMORY_SIZE).contains(&size) || !size.is_multiple_of(MIN_MEMORY_SIZE) {
            return Err(InvalidMemorySize(size));
        }
        let n = (size >> CHUNK_SHIFT) as usize;
        let chunks = (0..n).map(|_| OnceLock::new()).collect();
        Ok(Self { size, chunks })
    }

    /// Size of the address space in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages that hold real memory (were written at least once).
    pub fn resident_pages(&self) -> usize {
        self.chunks.iter().filter_map(|c| c.get()).map(|c| c.iter().filter(|p| p.get().is_some()).count()).sum()
    }

    fn check(&self, addr: Hpa, len: u64) -> Result<(), MemoryError> {
        match addr.0.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemoryError::OutOfRange { addr, len, size: self.size }),
        }
    }

    #[inline]
    fn page(&self, pfn: u64) -> Option<&Page> {
        let chunk = self.chunks.get((pfn >> 9) as usize)?.get()?;
        chunk[(pfn as usize) & (PAGES_PER_CHUNK - 1)].get().map(|b| &**b)
    }

    #[inline]
    fn page_or_alloc(&self, pfn: u64) -> &Page {
        // `pfn` has been range-checked by the caller, so the index is in bounds.
        let chunk =
            self.chunks[(pfn >> 9) as usize].get_or_init(|| Box::new([const { OnceLock::new() }; PAGES_PER_CHUNK]));
        chunk[(pfn as usize) & (PAGES_PER_CHUNK - 1)]
            .get_or_init(|| Box::new([const { AtomicU64::new(0) }; WORDS_PER_PAGE]))
    }

    /// Loads one naturally aligned 64-bit word (acquire: table entries publish their
    /// next-level tables).
    #[inline]
    pub fn read_u64(&self, addr: Hpa) -> Result<u64, MemoryError> {
        if addr.0 & 7 != 0 {
            return Err(MemoryError::Misaligned(addr));
        }
        self.check(addr, 8)?;
        Ok(self.page(addr.pfn()).map_or(0, |p| p[word_index(addr.0)].load(Ordering::Acquire)))
    }

    /// Stores one naturally aligned 64-bit word (release).
    pub fn write_u64(&self, addr: Hpa, value: u64) -> Result<(), MemoryError> {
        if addr.0 & 7 != 0 {
            return Err(MemoryError::Misaligned(addr));
        }
        self.check(addr, 8)?;
        if value == 0 && self.page(addr.pfn()).is_none() {
            return Ok(()); // already zero; stay sparse
        }
        self.page_or_alloc(addr.pfn())[word_index(addr.0)].store(value, Ordering::Release);
        Ok(())
    }

    /// Reads `buf.len()` bytes starting at `addr` (any alignment).
    pub fn read(&self, addr: Hpa, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check(addr, buf.len() as u64)?;
        for Word { addr, skip, take, done } in words(addr.0, buf.len()) {
            let word = self.page(addr >> PAGE_SHIFT).map_or(0, |p| p[word_index(addr)].load(Ordering::Acquire));
            buf[done..done + take].copy_from_slice(&word.to_le_bytes()[skip..skip + take]);
        }
        Ok(())
    }

    /// Writes `data` starting at `addr` (any alignment). Partial words are merged
    /// atomically, so concurrent writers to other bytes of the same word are not lost.
    pub fn write(&self, addr: Hpa, data: &[u8]) -> Result<(), MemoryError> {
        self.check(addr, data.len() as u64)?;
        for Word { addr, skip, take, done } in words(addr.0, data.len()) {
            let word = &self.page_or_alloc(addr >> PAGE_SHIFT)[word_index(addr)];
            if take == 8 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[done..done + 8]);
                word.store(u64::from_le_bytes(b), Ordering::Release);
            } else {
                let mut mask_bytes = [0u8; 8];
                let mut val_bytes = [0u8; 8];
                mask_bytes[skip..skip + take].fill(0xff);
                val_bytes[skip..skip + take].copy_from_slice(&data[done..done + take]);
                let mask = u64::from_le_bytes(mask_bytes);
                let val = u64::from_le_bytes(val_bytes);
                // fetch_update never fails with a closure that always returns Some.
                let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| Some((old & !mask) | val));
            }
        }
        Ok(())
    }

    /// Fills `len` bytes at `addr` with zeros (a freshly allocated table page).
    pub fn zero(&self, addr: Hpa, len: u64) -> Result<(), MemoryError> {
        self.check(addr, len)?;
        let mut a = addr.0;
        let end = addr.0 + len;
        while a < end {
            let page_end = ((a >> PAGE_SHIFT) + 1) << PAGE_SHIFT;
            let stop = page_end.min(end);
            if self.page(a >> PAGE_SHIFT).is_some() {
                if a & 7 == 0 && stop & 7 == 0 {
                    let p = self.page_or_alloc(a >> PAGE_SHIFT);
                    for w in ((a & (PAGE_SIZE - 1)) >> 3)..(((stop - 1) & (PAGE_SIZE - 1)) >> 3) + 1 {
                        p[w as usize].store(0, Ordering::Release);
                    }
                } else {
                    self.write(Hpa(a), &vec![0u8; (stop - a) as usize])?;
                }
            }
            a = stop;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_memory_reads_zero_and_stays_sparse() {
        let m = HostMemory::new(DEFAULT_MEMORY_SIZE).unwrap();
        assert_eq!(m.read_u64(Hpa(0xfff_f000)).unwrap(), 0);
        let mut buf = [0xaa; 20];
        m.read(Hpa(0x1234_5677), &mut buf).unwrap();
        assert_eq!(buf, [0; 20]);
        m.write_u64(Hpa(0x1000), 0).unwrap();
        assert_eq!(m.resident_pages(), 0);
    }

    #[test]
    fn words_and_bytes_agree() {
        let m = HostMemory::new(MIN_MEMORY_SIZE * 2).unwrap();
        m.write_u64(Hpa(0x2000), 0x0807_0605_0403_0201).unwrap();
        let mut b = [0u8; 3];
        m.read(Hpa(0x2003), &mut b).unwrap();
        assert_eq!(b, [4, 5, 6]);
        // unaligned write across a page boundary
        let data: Vec<u8> = (0..16).collect();
        m.write(Hpa(0x2ff9), &data).unwrap();
        let mut back = [0u8; 16];
        m.read(Hpa(0x2ff9), &mut back).unwrap();
        assert_eq!(&back[..], &data[..]);
        assert_eq!(m.resident_pages(), 2);
        // partial-word write keeps the neighbouring bytes
        m.write(Hpa(0x2001), &[0xff]).unwrap();
        assert_eq!(m.read_u64(Hpa(0x2000)).unwrap(), 0x0807_0605_0403_ff01);
        m.zero(Hpa(0x2000), 8).unwrap();
        assert_eq!(m.read_u64(Hpa(0x2000)).unwrap(), 0);
    }

    #[test]
    fn bad_accesses_are_typed_errors() {
        let m = HostMemory::new(MIN_MEMORY_SIZE).unwrap();
        assert!(matches!(m.read_u64(Hpa(3)), Err(MemoryError::Misaligned(_))));
        assert!(matches!(m.read_u64(Hpa(MIN_MEMORY_SIZE)), Err(MemoryError::OutOfRange { .. })));
        let mut b = [0u8; 2];
        assert!(m.read(Hpa(MIN_MEMORY_SIZE - 1), &mut b).is_err());
        assert!(m.write(Hpa(u64::MAX), &[1]).is_err());
        assert!(HostMemory::new(0).is_err());
        assert!(HostMemory::new(MIN_MEMORY_SIZE + 1).is_err());
        assert!(HostMemory::new(MAX_MEMORY_SIZE * 2).is_err());
    }
}
