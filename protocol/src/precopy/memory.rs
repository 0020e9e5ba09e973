//! The guest-memory seam: what the engines need from a hypervisor or a synthetic guest.

use super::PrecopyError;

/// A guest's memory and run control, as the pre-copy engines see it.
pub trait GuestMemory {
    /// Page size in bytes (a power of two).
    fn page_size(&self) -> usize;
    /// Number of pages.
    fn page_count(&self) -> u64;
    /// Copy page `pfn` into `buf` (exactly one page long).
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> Result<(), PrecopyError>;
    /// Overwrite page `pfn` with `data` (exactly one page long).
    fn write_page(&mut self, pfn: u64, data: &[u8]) -> Result<(), PrecopyError>;
    /// OR the pages dirtied since the last call into `into`, and clear the log.
    fn take_dirty(&mut self, into: &mut DirtyBitmap);
    /// Stop the vCPUs (start of stop-and-copy).
    fn pause(&mut self);
    /// Run the vCPUs (rollback on the source, resume on the destination).
    fn resume(&mut self);
    /// Slow the vCPUs to `percent` (0 = full speed, 99 = nearly stopped).
    fn set_throttle(&mut self, percent: u8);
}

/// One bit per page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// All clear.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// All set.
    pub fn full(pages: u64) -> Self {
        let mut b = Self::new(pages);
        b.words.iter_mut().for_each(|w| *w = u64::MAX);
        b.trim();
        b
    }

    fn trim(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Number of pages covered.
    pub fn len(&self) -> u64 {
        self.pages
    }

    /// Whether it covers no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Mark `pfn` (ignored if out of range: the log of a misbehaving backend cannot grow it).
    pub fn set(&mut self, pfn: u64) {
        if pfn < self.pages {
            self.words[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
    }

    /// Whether `pfn` is marked.
    pub fn get(&self, pfn: u64) -> bool {
        pfn < self.pages && self.words[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    /// Clear `pfn`.
    pub fn clear(&mut self, pfn: u64) {
        if pfn < self.pages {
            self.words[(pfn / 64) as usize] &= !(1 << (pfn % 64));
        }
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// OR another bitmap of the same size into this one.
    pub fn union(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Clear all.
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// The 64 bits of word `i` (pages `64*i .. 64*i+63`); 0 past the end.
    pub fn word(&self, i: u64) -> u64 {
        self.words.get(i as usize).copied().unwrap_or(0)
    }

    /// Clear word `i`.
    pub fn clear_word(&mut self, i: u64) {
        if let Some(w) = self.words.get_mut(i as usize) {
            *w = 0;
        }
    }

    /// Clear the bits of `mask` in word `i`.
    pub fn clear_bits(&mut self, i: u64, mask: u64) {
        if let Some(w) = self.words.get_mut(i as usize) {
            *w &= !mask;
        }
    }

    /// Index of the first non-zero word at or after `i`.
    pub fn next_word(&self, i: u64) -> Option<u64> {
        self.words
            .iter()
            .skip(i as usize)
            .position(|&w| w != 0)
            .map(|p| i + p as u64)
    }
}
