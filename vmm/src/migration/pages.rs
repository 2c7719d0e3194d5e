//! Page bookkeeping shared by both sides of a migration: numbering every guest RAM page
//! (across the regions below and above the MMIO hole) and sets of page numbers.

use crate::memory::GuestRam;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub const PAGE: u64 = 4096;

/// One RAM region: where it sits in the guest and in this process, and the number of
/// its first page.
#[derive(Debug, Clone, Copy)]
struct Span {
    gpa: u64,
    host: usize,
    pages: u64,
    first: u64,
}

/// Page numbers for guest RAM: page `n` is the n-th 4 KiB page counting region by region.
#[derive(Debug, Clone)]
pub struct PageMap {
    spans: Vec<Span>,
    total: u64,
}

impl PageMap {
    pub fn new(ram: &GuestRam) -> PageMap {
        let mut spans = Vec::new();
        let mut total = 0;
        for region in ram.iter() {
            let pages = region.len() / PAGE;
            spans.push(Span { gpa: region.start_addr().0, host: region.as_ptr() as usize, pages, first: total });
            total += pages;
        }
        PageMap { spans, total }
    }

    /// How many pages of RAM there are.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The page holding guest-physical address `gpa`, if it is RAM.
    pub fn index_of_gpa(&self, gpa: u64) -> Option<u64> {
        self.spans.iter().find(|s| gpa >= s.gpa && gpa < s.gpa + s.pages * PAGE).map(|s| s.first + (gpa - s.gpa) / PAGE)
    }

    /// The page holding host address `addr` of this process's RAM mapping.
    pub fn index_of_host(&self, addr: usize) -> Option<u64> {
        self.spans
            .iter()
            .find(|s| addr >= s.host && addr < s.host + (s.pages * PAGE) as usize)
            .map(|s| s.first + (addr - s.host) as u64 / PAGE)
    }

    /// Guest-physical address of page `index` (which must be below `total`).
    pub fn gpa(&self, index: u64) -> u64 {
        self.spans
            .iter()
            .find(|s| index >= s.first && index < s.first + s.pages)
            .map_or(u64::MAX, |s| s.gpa + (index - s.first) * PAGE)
    }

    /// Host address of page `index`.
    pub fn host(&self, index: u64) -> usize {
        self.spans
            .iter()
            .find(|s| index >= s.first && index < s.first + s.pages)
            .map_or(0, |s| s.host + ((index - s.first) * PAGE) as usize)
    }

    /// How many pages from `index` on lie in the same region (a run must not cross one).
    pub fn run_limit(&self, index: u64) -> u64 {
        self.spans
            .iter()
            .find(|s| index >= s.first && index < s.first + s.pages)
            .map_or(0, |s| s.first + s.pages - index)
    }
}

/// The positions of the set bits of a bitmap (KVM's dirty log layout), in order.
pub fn set_bits(words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(|(w, &word)| {
        let mut word = word;
        std::iter::from_fn(move || {
            (word != 0).then(|| {
                let bit = w as u64 * 64 + u64::from(word.trailing_zeros());
                word &= word - 1;
                bit
            })
        })
    })
}

/// A set of page numbers that several threads read and update.
pub struct PageSet {
    words: Vec<AtomicU64>,
    len: u64,
}

impl PageSet {
    pub fn new(len: u64) -> PageSet {
        PageSet { words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), len }
    }

    /// Every page: whole words at once (this runs inside the downtime window).
    pub fn full(len: u64) -> PageSet {
        let words = (0..len.div_ceil(64))
            .map(|w| {
                let left = len - w * 64;
                AtomicU64::new(if left >= 64 { u64::MAX } else { (1u64 << left) - 1 })
            })
            .collect();
        PageSet { words, len }
    }

    /// Adds every member of `other` (same length), word by word.
    pub fn union(&self, other: &PageSet) {
        for (mine, theirs) in self.words.iter().zip(&other.words) {
            mine.fetch_or(theirs.load(Ordering::Acquire), Ordering::AcqRel);
        }
    }

    /// Removes every member of `other` (same length), word by word.
    pub fn subtract(&self, other: &PageSet) {
        for (mine, theirs) in self.words.iter().zip(&other.words) {
            mine.fetch_and(!theirs.load(Ordering::Acquire), Ordering::AcqRel);
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Adds `i`; returns whether it was absent.
    pub fn insert(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Removes `i`; returns whether it was present.
    pub fn remove(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Removes every member.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }

    /// The first member at or after `from`.
    pub fn next_from(&self, from: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        let mut mask = u64::MAX.checked_shl((from % 64) as u32).unwrap_or(0);
        while w < self.words.len() {
            let word = self.words[w].load(Ordering::Acquire) & mask;
            if word != 0 {
                let i = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (i < self.len).then_some(i);
            }
            w += 1;
            mask = u64::MAX;
        }
        None
    }

    /// The pages set in per-region bitmaps (KVM's dirty log layout: one bit per page,
    /// regions in the page map's order).
    pub fn from_bitmaps(map: &PageMap, bitmaps: &[Vec<u64>]) -> PageSet {
        let set = PageSet::new(map.total());
        for (span, bits) in map.spans.iter().zip(bitmaps) {
            for bit in set_bits(bits).take_while(|&bit| bit < span.pages) {
                set.insert(span.first + bit);
            }
        }
        set
    }

    /// Members as `(gpa, pages)` ranges, contiguous within a region.
    pub fn ranges(&self, map: &PageMap) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        while let Some(i) = self.next_from(at) {
            let gpa = map.gpa(i);
            match out.last_mut() {
                Some((start, n)) if *start + *n * PAGE == gpa => *n += 1,
                _ => out.push((gpa, 1)),
            }
            at = i + 1;
        }
        out
    }

    /// Adds every page of `(gpa, pages)` ranges; refuses ranges outside RAM.
    pub fn insert_ranges(&self, map: &PageMap, ranges: &[(u64, u64)]) -> Result<(), String> {
        for &(gpa, pages) in ranges {
            let first = map.index_of_gpa(gpa).filter(|_| gpa % PAGE == 0);
            match first {
                Some(first) if pages <= map.run_limit(first) => (first..first + pages).for_each(|i| {
                    self.insert(i);
                }),
                _ => return Err(format!("page range {gpa:#x}+{pages} lies outside guest RAM")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_and_sets() {
        let ram = crate::memory::create_ram(8 << 20).unwrap();
        let map = PageMap::new(&ram);
        assert_eq!(map.total(), 2048);
        assert_eq!(map.index_of_gpa(0x3000), Some(3));
        assert_eq!(map.gpa(3), 0x3000);
        assert_eq!(map.index_of_host(map.host(5) + 17), Some(5));
        assert_eq!(map.index_of_gpa(8 << 20), None);
        let set = PageSet::new(map.total());
        assert!(set.insert(3) && !set.insert(3));
        set.insert(4);
        set.insert(100);
        assert_eq!(set.ranges(&map), vec![(0x3000, 2), (100 * PAGE, 1)]);
        assert_eq!(set.next_from(5), Some(100));
        assert!(set.remove(100) && !set.remove(100));
        assert_eq!(set.count(), 2);
        assert_eq!(set_bits(&[0b1010, 1 << 63, 1]).collect::<Vec<_>>(), vec![1, 3, 127, 128]);
        let full = PageSet::full(100);
        assert_eq!((full.count(), full.next_from(99), full.next_from(100)), (100, Some(99), None));
        full.subtract(&set);
        assert_eq!(full.count(), 98);
        let other = PageSet::new(map.total());
        other.insert_ranges(&map, &set.ranges(&map)).unwrap();
        assert_eq!(other.count(), 2);
        assert!(other.insert_ranges(&map, &[(0x1001, 1)]).is_err());
        assert!(other.insert_ranges(&map, &[(0, 4096)]).is_err());
    }
}
