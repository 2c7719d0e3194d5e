//! Pre-copy's delta encoding of pages sent again (QEMU's XBZRLE does the same job).
//!
//! A guest that keeps dirtying a working set usually changes a few words of each page
//! between two rounds (the bundled dirtier: 16 bytes of 4096). The source keeps a copy of
//! every page it sends, in a cache of bounded size, from round 0 (plain pre-copy: round 1
//! keeps the pages written again, `Cache::retain`) or once the rounds show it
//! (`source::keeps_coming_back`); when it sends such a
//! page again, it sends only the runs of 8-byte words that changed, and the destination
//! writes them over the copy it holds. On the wire a delta is a list of runs
//! `offset u16 | len u16 | bytes`, inside one page.
//!
//! Why it pays even over loopback: a full page costs a copy into the frame, one through the
//! socket and one into guest RAM, and on a small host those compete with the guest for the
//! same cores; a delta costs one compare and one copy into the cache, and almost nothing
//! on the destination. Over a slow link it is the difference between rounds that converge
//! and rounds that never do.

use super::pages::{PageMap, PAGE};

const WORD: usize = 8;
const RUN_HEADER: usize = 4;
/// A delta larger than this goes as the full page instead (then it saves too little).
const MAX_DELTA: usize = PAGE as usize / 2;
/// Cache slots are allocated this many at a time, as pages arrive (an idle guest's
/// migration allocates none).
const CHUNK_PAGES: usize = 256;
const NO_SLOT: u32 = u32::MAX;

/// Delta errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Malformed page delta: {0}")]
    Malformed(&'static str),
}

/// The source's copies of the pages it sent, as the destination holds them.
pub struct Cache {
    map: PageMap,
    /// Slot of each page (by `PageMap` number), or `NO_SLOT`.
    slot_of: Vec<u32>,
    /// The slots' bytes, `CHUNK_PAGES` pages per chunk.
    chunks: Vec<Vec<u8>>,
    used: usize,
    capacity: usize,
    /// Slots given back by `retain`, used before new ones.
    free: Vec<u32>,
    /// The last encoded delta.
    runs: Vec<u8>,
}

/// What `Cache::encode` found.
#[derive(Debug, PartialEq)]
pub enum Encoded {
    /// The page changed little since it was sent: its delta is in `Cache::runs`.
    Delta,
    /// Send the whole page (not cached before, or changed too much).
    Full,
}

impl Cache {
    /// A cache of at most `bytes` for the RAM `map` numbers.
    pub fn new(map: PageMap, bytes: u64) -> Cache {
        let capacity = usize::try_from(bytes / PAGE).unwrap_or(usize::MAX).min(NO_SLOT as usize - 1);
        let slot_of = vec![NO_SLOT; usize::try_from(map.total()).unwrap_or(0)];
        Cache {
            map,
            slot_of,
            chunks: Vec::new(),
            used: 0,
            capacity,
            free: Vec::new(),
            runs: Vec::with_capacity(MAX_DELTA),
        }
    }

    /// Bytes the cache holds now.
    pub fn bytes(&self) -> u64 {
        (self.chunks.len() * CHUNK_PAGES) as u64 * PAGE
    }

    /// Page `gpa` goes out with `new` as its bytes: records them as what the destination
    /// will hold, and says whether a delta (left in `runs`) can stand in for the page.
    pub fn encode(&mut self, gpa: u64, new: &[u8]) -> Encoded {
        let Some((slot, fresh)) = self.slot(gpa) else { return Encoded::Full };
        let old = slot_bytes(&mut self.chunks, slot);
        let delta = !fresh && new.len() == old.len() && diff(old, new, &mut self.runs);
        old.copy_from_slice(&new[..old.len().min(new.len())]);
        if delta {
            Encoded::Delta
        } else {
            Encoded::Full
        }
    }

    /// `encode` for the last pages of a migration, sent as the vCPUs pause: the page leaves
    /// the cache instead of updating it (a 4 KiB copy a page, inside the downtime, for a
    /// copy no later round reads), so should it go once more it goes whole; a page not
    /// cached goes whole and is not cached.
    pub fn encode_last(&mut self, gpa: u64, new: &[u8]) -> Encoded {
        let Some(index) = self.index(gpa).filter(|&i| self.slot_of[i] != NO_SLOT) else { return Encoded::Full };
        let slot = self.slot_of[index] as usize;
        self.slot_of[index] = NO_SLOT;
        self.free.push(slot as u32);
        let old = slot_bytes(&mut self.chunks, slot);
        if new.len() == old.len() && diff(old, new, &mut self.runs) {
            Encoded::Delta
        } else {
            Encoded::Full
        }
    }

    /// Page `gpa` goes out as a zero record: the destination clears it.
    pub fn zeroed(&mut self, gpa: u64) {
        if let Some(slot) = self.index(gpa).map(|i| self.slot_of[i]).filter(|&s| s != NO_SLOT) {
            slot_bytes(&mut self.chunks, slot as usize).fill(0);
        }
    }

    /// Forgets every cached page for which `keep` (its `PageMap` number) says no, and
    /// reuses the slots: round 0's copies of pages the guest left alone make room for the
    /// ones it keeps writing.
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        for (index, entry) in self.slot_of.iter_mut().enumerate() {
            if *entry != NO_SLOT && !keep(index as u64) {
                self.free.push(*entry);
                *entry = NO_SLOT;
            }
        }
    }

    /// Pages the cache holds now.
    pub fn pages(&self) -> usize {
        self.used - self.free.len()
    }

    /// The delta `encode` left.
    pub fn runs(&self) -> &[u8] {
        &self.runs
    }

    /// The slot page `gpa` has, or a new one while there is room (then `true`: it holds
    /// nothing the destination has).
    fn slot(&mut self, gpa: u64) -> Option<(usize, bool)> {
        let index = self.index(gpa)?;
        let entry = &mut self.slot_of[index];
        if *entry != NO_SLOT {
            return Some((*entry as usize, false));
        }
        if let Some(slot) = self.free.pop() {
            *entry = slot;
            return Some((slot as usize, true));
        }
        if self.used == self.capacity {
            return None;
        }
        let slot = self.used;
        if slot / CHUNK_PAGES == self.chunks.len() {
            self.chunks.push(vec![0; CHUNK_PAGES * PAGE as usize]);
        }
        self.used += 1;
        *entry = slot as u32;
        Some((slot, true))
    }

    /// Page `gpa`'s index in `slot_of`; `None` outside RAM.
    fn index(&self, gpa: u64) -> Option<usize> {
        usize::try_from(self.map.index_of_gpa(gpa)?).ok().filter(|&i| i < self.slot_of.len())
    }
}

/// The bytes of cache slot `slot`, in `CHUNK_PAGES`-page chunks.
fn slot_bytes(chunks: &mut [Vec<u8>], slot: usize) -> &mut [u8] {
    &mut chunks[slot / CHUNK_PAGES][(slot % CHUNK_PAGES) * PAGE as usize..][..PAGE as usize]
}

/// Word `i` of `bytes`.
fn word(bytes: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(bytes[i * WORD..(i + 1) * WORD].try_into().unwrap_or([0; WORD]))
}

/// Encodes the words that differ between `old` and `new` (equal lengths, whole words) as
/// runs into `out`; false when the delta would exceed `MAX_DELTA`.
fn diff(old: &[u8], new: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let words = old.len() / WORD;
    let mut i = 0;
    while i < words {
        // Equal 64-byte blocks are skipped with one compare each.
        if i % 8 == 0 && i + 8 <= words && old[i * WORD..(i + 8) * WORD] == new[i * WORD..(i + 8) * WORD] {
            i += 8;
            continue;
        }
        if word(old, i) == word(new, i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < words && word(old, i) != word(new, i) {
            i += 1;
        }
        let (offset, len) = (start * WORD, (i - start) * WORD);
        if out.len() + RUN_HEADER + len > MAX_DELTA {
            return false;
        }
        out.extend_from_slice(&(offset as u16).to_le_bytes());
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&new[offset..offset + len]);
    }
    true
}

/// Checks a whole delta, so that a malformed one is refused before any of it is written.
pub fn check(delta: &[u8]) -> Result<(), Error> {
    runs(delta).try_for_each(|run| run.map(drop))
}

/// The runs of a delta, each `(offset in the page, bytes)`, read as they come (no
/// allocation per page); an error ends them.
pub fn runs(delta: &[u8]) -> impl Iterator<Item = Result<(usize, &[u8]), Error>> {
    let mut rest = delta;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let run = next_run(rest);
        rest = match &run {
            Ok((_, bytes)) => &rest[RUN_HEADER + bytes.len()..],
            Err(_) => &[],
        };
        Some(run)
    })
}

/// The run at the start of `rest`.
fn next_run(rest: &[u8]) -> Result<(usize, &[u8]), Error> {
    let header = rest.get(..RUN_HEADER).ok_or(Error::Malformed("truncated run header"))?;
    let offset = usize::from(u16::from_le_bytes([header[0], header[1]]));
    let len = usize::from(u16::from_le_bytes([header[2], header[3]]));
    if len == 0 || offset + len > PAGE as usize {
        return Err(Error::Malformed("run outside the page"));
    }
    let bytes = rest.get(RUN_HEADER..RUN_HEADER + len).ok_or(Error::Malformed("run data past the delta"))?;
    Ok((offset, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    fn cache(bytes: u64) -> Cache {
        Cache::new(PageMap::new(&memory::create_ram(16 << 20).unwrap()), bytes)
    }

    fn patch(old: &[u8], delta: &[u8]) -> Vec<u8> {
        let mut page = old.to_vec();
        for (offset, bytes) in runs(delta).map(Result::unwrap) {
            page[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        page
    }

    #[test]
    fn a_page_sent_again_goes_as_the_words_that_changed() {
        let mut cache = cache(1 << 20);
        let mut page = vec![0x5au8; PAGE as usize];
        // First time: the whole page (and now cached).
        assert_eq!(cache.encode(0x3000, &page), Encoded::Full);
        let sent = page.clone();
        // The dirtier's change: a stamp at each end.
        page[..8].copy_from_slice(&7u64.to_le_bytes());
        page[4088..].copy_from_slice(&(!7u64).to_le_bytes());
        page[100] = 1; // inside word 12
        assert_eq!(cache.encode(0x3000, &page), Encoded::Delta);
        assert_eq!(cache.runs().len(), 3 * (RUN_HEADER + WORD));
        assert_eq!(patch(&sent, cache.runs()), page);
        // Unchanged: an empty delta.
        assert_eq!(cache.encode(0x3000, &page), Encoded::Delta);
        assert!(cache.runs().is_empty());
        // Changed all over: the full page, and the cache follows.
        let other = vec![0x11u8; PAGE as usize];
        assert_eq!(cache.encode(0x3000, &other), Encoded::Full);
        let mut again = other.clone();
        again[8..16].fill(0);
        assert_eq!(cache.encode(0x3000, &again), Encoded::Delta);
        assert_eq!(patch(&other, cache.runs()), again);
        // Cleared by a zero record: the next delta is against zeros.
        cache.zeroed(0x3000);
        assert_eq!(cache.encode(0x3000, &again), Encoded::Full, "mostly non-zero: too large a delta");
    }

    #[test]
    fn the_last_pages_leave_the_cache_as_they_go() {
        let mut cache = cache(4 * PAGE);
        let mut page = vec![3u8; PAGE as usize];
        assert_eq!(cache.encode(0, &page), Encoded::Full);
        let sent = page.clone();
        page[8] = 4;
        assert_eq!(cache.encode_last(0, &page), Encoded::Delta);
        assert_eq!(patch(&sent, cache.runs()), page);
        assert_eq!(cache.pages(), 0, "out of the cache");
        // Once more (the vCPU wrote it again before it stopped): whole, and not cached.
        assert_eq!(cache.encode_last(0, &page), Encoded::Full);
        assert_eq!(cache.encode_last(PAGE, &page), Encoded::Full);
        assert_eq!(cache.pages(), 0);
    }

    #[test]
    fn pages_not_kept_give_their_slots_to_others() {
        let mut cache = cache(2 * PAGE);
        let page = vec![1u8; PAGE as usize];
        for gpa in [0, PAGE] {
            assert_eq!(cache.encode(gpa, &page), Encoded::Full);
        }
        assert_eq!(cache.encode(2 * PAGE, &page), Encoded::Full, "full");
        cache.retain(|i| i == 1);
        assert_eq!(cache.pages(), 1);
        assert_eq!(cache.encode(PAGE, &page), Encoded::Delta, "kept");
        // Page 2 takes page 0's slot, and holds none of page 0's bytes for a delta.
        assert_eq!(cache.encode(2 * PAGE, &page), Encoded::Full);
        assert_eq!(cache.encode(2 * PAGE, &page), Encoded::Delta);
        assert_eq!(cache.encode(0, &page), Encoded::Full, "forgotten, and no room again");
        assert_eq!(cache.pages(), 2);
    }

    #[test]
    fn a_full_cache_takes_no_more_pages_and_pages_outside_ram_none() {
        let mut cache = cache(2 * PAGE);
        let page = vec![1u8; PAGE as usize];
        for gpa in [0, PAGE, 2 * PAGE] {
            assert_eq!(cache.encode(gpa, &page), Encoded::Full);
        }
        assert_eq!(cache.encode(0, &page), Encoded::Delta);
        assert_eq!(cache.encode(PAGE, &page), Encoded::Delta);
        assert_eq!(cache.encode(2 * PAGE, &page), Encoded::Full, "no room was left for it");
        assert_eq!(cache.encode(1 << 40, &page), Encoded::Full);
        assert_eq!(cache.bytes(), CHUNK_PAGES as u64 * PAGE);
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let run = |offset: u16, len: u16, data: usize| {
            let mut v = offset.to_le_bytes().to_vec();
            v.extend_from_slice(&len.to_le_bytes());
            v.extend(std::iter::repeat_n(1u8, data));
            v
        };
        let two = [run(4088, 8, 8), run(0, 16, 16)].concat();
        assert_eq!(runs(&two).collect::<Result<Vec<_>, _>>().unwrap(), [(4088, &[1u8; 8][..]), (0, &[1u8; 16][..])]);
        assert!(check(&run(4090, 8, 8)).is_err(), "past the page");
        assert!(check(&run(0, 0, 0)).is_err(), "empty run");
        assert!(check(&run(0, 16, 8)).is_err(), "data missing");
        assert!(check(&run(0, 8, 8)[..3]).is_err(), "header cut");
        assert!(check(&[run(0, 8, 8), run(9000, 8, 8)].concat()).is_err(), "a bad run after a good one");
        assert!(runs(&[]).next().is_none());
    }
}
