//! The bitmap of the VMM's own writes to guest RAM (hypercall results, the generation
//! word: KVM's dirty log does not see them). vm-memory marks it on every write through
//! `GuestRam`; a migration takes it with KVM's log at every round and twice inside the
//! downtime.
//!
//! Two levels: a bit per page, and a bit per word of page bits that may hold one. A take
//! reads the second level (64 words for 1 GiB) and clears only the page words it names.
//! vm-memory's `AtomicBitmap` has one level, and taking it is an atomic read-and-clear of
//! every word (32 us for 1 GiB on the test host), paid twice inside every downtime for the
//! handful of pages a guest's hypercalls had the VMM write.

use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// The page size the bits count in (KVM's dirty log counts 4 KiB pages too).
const PAGE: usize = 4096;

/// One bit per page written by the VMM since the last take.
#[derive(Debug, Default)]
pub struct DirtyBitmap {
    /// Bit `p % 64` of word `p / 64`: page `p` was written.
    pages: Vec<AtomicU64>,
    /// Bit `w % 64` of word `w / 64`: word `w` of `pages` may have bits set. A mark sets
    /// its page bit first and this second; a take clears this first and the page word
    /// second, so a mark racing with a take is found by the next take.
    words: Vec<AtomicU64>,
}

impl DirtyBitmap {
    /// The page words written since the last take, as `(word index, bits)` (bit `i` of word
    /// `w`: page `64 w + i`), now clear.
    pub fn take(&self) -> Vec<(usize, u64)> {
        let mut taken = Vec::new();
        for (index, summary) in self.words.iter().enumerate() {
            if summary.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut flagged = summary.swap(0, Ordering::SeqCst);
            while flagged != 0 {
                let word = index * 64 + flagged.trailing_zeros() as usize;
                flagged &= flagged - 1;
                let bits = self.pages.get(word).map_or(0, |w| w.swap(0, Ordering::SeqCst));
                if bits != 0 {
                    taken.push((word, bits));
                }
            }
        }
        taken
    }

    /// Marks page `index` written (pages past the end are ignored).
    pub fn set_bit(&self, index: usize) {
        let word = index / 64;
        let Some(bits) = self.pages.get(word) else {
            return;
        };
        bits.fetch_or(1 << (index % 64), Ordering::SeqCst);
        self.words[word / 64].fetch_or(1 << (word % 64), Ordering::SeqCst);
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        // An end past `usize` is cut at its last page (as vm-memory's own bitmap does).
        let last = offset.saturating_add(len - 1) / PAGE;
        for page in offset / PAGE..=last.min(self.pages.len() * 64) {
            self.set_bit(page);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset / PAGE;
        self.pages.get(page / 64).is_some_and(|bits| bits.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(len: usize) -> Self {
        let words = len.div_ceil(PAGE).div_ceil(64);
        DirtyBitmap {
            pages: (0..words).map(|_| AtomicU64::new(0)).collect(),
            words: (0..words.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    fn pages(taken: &[(usize, u64)]) -> Vec<usize> {
        taken
            .iter()
            .flat_map(|&(w, bits)| (0..64).filter(move |b| bits >> b & 1 == 1).map(move |b| w * 64 + b))
            .collect()
    }

    #[test]
    fn a_take_finds_the_writes_since_the_last_and_nothing_twice() {
        let ram = crate::memory::create_ram(64 << 20).expect("RAM");
        let bitmap = || vm_memory::MmapRegion::bitmap(&**ram.iter().next().expect("a region"));
        assert_eq!(bitmap().take(), [], "a fresh VM wrote nothing");
        ram.write_obj(7u64, GuestAddress(0x3008)).expect("write");
        // Across a page-word and a summary-word boundary (pages 4095 and 4096).
        ram.write_slice(&[1; 5000], GuestAddress(0xfff_000)).expect("write");
        ram.write_obj(1u8, GuestAddress((64 << 20) - 1)).expect("write");
        assert!(bitmap().dirty_at(0x3000) && !bitmap().dirty_at(0x4000));
        assert_eq!(pages(&bitmap().take()), [3, 4095, 4096, 16383]);
        assert_eq!(bitmap().take(), [], "taken once");
        assert!(!bitmap().dirty_at(0x3000));
        bitmap().set_bit(9);
        bitmap().set_bit(1 << 40);
        bitmap().mark_dirty(usize::MAX - 10, 100);
        assert_eq!(pages(&bitmap().take()), [9]);
    }
}
