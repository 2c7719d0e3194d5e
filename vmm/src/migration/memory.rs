//! Guest memory on the wire: `Memory` frames of page records,
//! `gpa u64 | npages u32 | flags u32` followed, unless flag ZERO is set, by the pages'
//! bytes. Pages the host never made resident (`mincore`) and pages that read as zero go as
//! ZERO records without data; in the first full pass they also carry FRESH (the
//! destination's RAM is still zero there: nothing to write), in later pre-copy rounds they
//! do not (the destination must clear a page it received earlier). In later pre-copy
//! rounds, a page sent before may go as a DELTA record (one page, then `len u32` and the
//! runs of `delta`) that the destination writes over its copy. A CRC32 over every Memory payload
//! is checked at Complete. A payload may travel lz4-compressed (MemoryLz4, see `compress`);
//! the checksum covers it raw.

use super::compress;
use super::delta::{self, Encoded};
use super::pages::{PageMap, PageSet};

use super::protocol::{self, Kind};
use crate::memory::{self, GuestRam};
use std::io::Write;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use super::pages::PAGE;
const ZERO: u32 = 1;
const FRESH: u32 = 2;
const DELTA: u32 = 4;
pub const RECORD_HEADER: usize = 16;
/// The longest run list a DELTA record may carry (the sender keeps them under half a
/// page; a receiver reads at most this for one).
const DELTA_MAX_LEN: usize = 2 * PAGE as usize;
/// Payload size at which a frame is sent.
const FRAME_TARGET: usize = 4 << 20;

/// What was sent or received.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Transfer {
    pub pages: u64,
    pub zero_pages: u64,
    /// Pages that went as deltas of what was sent before.
    pub delta_pages: u64,
    pub bytes_on_wire: u64,
    /// Memory frames that went compressed, and the bytes that saved.
    pub compressed_frames: u64,
    pub compression_saved: u64,
    pub crc32: u32,
}

/// Memory errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
    #[error("Malformed memory record: {0}")]
    Record(String),
    #[error("Memory record {gpa:#x}+{pages} pages lies outside guest RAM")]
    OutsideRam { gpa: u64, pages: u64 },
    #[error("Memory checksum mismatch: received {received:#x}, the source sent {sent:#x}")]
    Checksum { received: u32, sent: u32 },
    #[error("Guest RAM differs from the source's at the pause (CRC32 {here:#x} here, {expected:#x} there)")]
    RamDiffers { here: u32, expected: u32 },
    #[error("Guest memory access failed")]
    Guest(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Compressed(#[from] compress::Error),
}

/// Which pages of `[host, host + len)` are resident, one bool per page.
pub fn residency(host: *mut u8, len: usize) -> Vec<bool> {
    let pages = len.div_ceil(PAGE as usize);
    let mut vec = vec![0u8; pages];
    // SAFETY: `host` is the start of a live, page-aligned guest RAM mapping of `len` bytes,
    // and `vec` has one byte per page as mincore requires.
    let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        // Unknown residency: treat every page as resident (correct, only slower).
        return vec![true; pages];
    }
    vec.iter().map(|b| b & 1 != 0).collect()
}

/// The resident pages of guest RAM as `(gpa, pages)` ranges: what a full pass will send
/// with data (or find zero), told to the destination ahead so it can allocate them.
pub fn resident_ranges(ram: &GuestRam) -> Vec<(u64, u64)> {
    let map = PageMap::new(ram);
    let resident = PageSet::new(map.total());
    for region in ram.iter() {
        let Some(first) = map.index_of_gpa(region.start_addr().0) else { continue };
        let present = residency(region.as_ptr(), region.len() as usize);
        for (i, _) in present.iter().enumerate().filter(|(_, &p)| p) {
            resident.insert(first + i as u64);
        }
    }
    resident.ranges(&map)
}

/// Ranges per Populate message: at most ~46 bytes of JSON each, so ~3 MB a message, far
/// below the frame limit.
const POPULATE_RANGES: usize = 65_536;
/// Pages per Populate message (1 GiB): each message is answered once its pages are
/// allocated, which must come well within the peer timeout (30 s) even on a host that
/// takes 9 us a page (~2.4 s).
const POPULATE_PAGES: u64 = 1 << 18;

/// `ranges` split into Populate messages of at most [`POPULATE_RANGES`] ranges and
/// [`POPULATE_PAGES`] pages each, in order.
pub fn populate_messages(ranges: &[(u64, u64)]) -> Vec<Vec<(u64, u64)>> {
    let mut messages = Vec::new();
    let (mut current, mut pages) = (Vec::new(), 0);
    for &(mut gpa, mut left) in ranges {
        while left > 0 {
            let take = left.min(POPULATE_PAGES - pages);
            current.push((gpa, take));
            (gpa, left, pages) = (gpa + take * PAGE, left - take, pages + take);
            if pages == POPULATE_PAGES || current.len() == POPULATE_RANGES {
                messages.push(std::mem::take(&mut current));
                pages = 0;
            }
        }
    }
    if !current.is_empty() {
        messages.push(current);
    }
    messages
}

/// How often (in pages) `Outgoing::send_all_until` asks whether to stop: 4 MiB.
const STOP_CHECK: u64 = 1024;

/// `--max-bandwidth`: bytes per second averaged from the start, shared by every sender
/// of one migration.
pub struct RateLimit {
    rate: u64,
    since: std::time::Instant,
    sent: std::sync::atomic::AtomicU64,
}

impl RateLimit {
    fn new(bytes_per_s: u64) -> RateLimit {
        RateLimit { rate: bytes_per_s.max(1), since: std::time::Instant::now(), sent: Default::default() }
    }

    fn spend(&self, bytes: u64) {
        let sent = self.sent.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
        let due = std::time::Duration::from_secs_f64(sent as f64 / self.rate as f64);
        if let Some(ahead) = due.checked_sub(self.since.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

/// The sending side of memory transfer, across pre-copy rounds.
pub struct Outgoing {
    frame: Vec<u8>,
    crc: crc32fast::Hasher,
    pub stats: Transfer,
    zero_run: Option<(u64, u32, u32)>,
    /// The data record at the end of the frame: where its header is, and the page that
    /// would extend it. Adjacent pages share one record, so that a receiver installs a run
    /// with one call (post-copy: one UFFDIO_CONTINUE or COPY per run, not per page).
    data_run: Option<(usize, u64)>,
    /// The guest is paused: pages are sent from guest RAM in place (`borrowed` says where
    /// in the frame each run goes) instead of being copied into the frame first.
    paused: Option<GuestRam>,
    /// Paused mode: runs of guest RAM `(frame offset, gpa, bytes)` the frame sends in place.
    borrowed: Vec<(usize, u64, usize)>,
    /// The bytes of those runs.
    borrowed_bytes: usize,
    /// Bytes per second not to exceed, and since when we count.
    limit: Option<std::sync::Arc<RateLimit>>,
    /// Post-copy: frames are PostcopyPages, each starting with the CRC32 of its records.
    postcopy: bool,
    /// Pre-copy rounds after the first: what was sent, to send pages again as deltas.
    deltas: Option<delta::Cache>,
    /// The last pages are going (`sending_last`): deltas leave the cache as they go.
    last: bool,
    /// Compresses Memory frames where it pays (`--compress`).
    packer: compress::Packer,
}

impl Default for Outgoing {
    fn default() -> Self {
        Outgoing {
            frame: Vec::with_capacity(FRAME_TARGET + PAGE as usize * 2),
            crc: crc32fast::Hasher::new(),
            stats: Transfer::default(),
            zero_run: None,
            data_run: None,
            paused: None,
            borrowed: Vec::new(),
            borrowed_bytes: 0,
            limit: None,
            postcopy: false,
            deltas: None,
            last: false,
            packer: compress::Packer::new(compress::Mode::Off),
        }
    }
}

impl Outgoing {
    /// Caps the rate at `bytes_per_s` (`--max-bandwidth`), averaged from now on.
    pub fn with_limit(bytes_per_s: Option<u64>) -> Self {
        Outgoing { limit: bytes_per_s.map(|r| std::sync::Arc::new(RateLimit::new(r))), ..Default::default() }
    }

    /// Compresses Memory and PostcopyPages frames as `mode` says (a `sibling`, post-copy's
    /// urgent channel, sends raw: its frames are answers a faulting guest waits for).
    pub fn compressing(self, mode: compress::Mode) -> Self {
        Outgoing { packer: compress::Packer::new(mode), ..self }
    }

    /// A second sender (post-copy's urgent channel) under the same rate cap.
    pub fn sibling(&self) -> Self {
        Outgoing { limit: self.limit.clone(), paused: self.paused.clone(), ..Default::default() }
    }

    /// The vCPUs are paused: pages go from guest RAM straight to the socket, one copy
    /// less per page.
    ///
    /// # Safety
    /// Every vCPU of the VM that owns `ram` stays paused for as long as this `Outgoing`
    /// (or a `sibling` of it made from now on) queues or sends pages.
    pub unsafe fn guest_paused(&mut self, ram: &GuestRam) {
        self.paused = Some(ram.clone());
    }

    /// From now on, keeps a copy of each page sent (in at most `bytes`) and sends a page
    /// sent again as its delta when that is small (`delta`): pre-copy, from round 0 (then
    /// `keep_cached` trims it at round 1) or once the rounds stop shrinking.
    pub fn start_deltas(&mut self, ram: &GuestRam, bytes: u64) {
        self.deltas = (bytes >= PAGE).then(|| delta::Cache::new(PageMap::new(ram), bytes));
    }

    /// Keeps in the delta cache only the pages set in `dirty` (one bitmap per RAM region):
    /// round 0 cached every data page it sent, and those the guest did not write again are
    /// unlikely to come back. Returns how many pages stay cached.
    pub fn keep_cached(&mut self, ram: &GuestRam, dirty: &[Vec<u64>]) -> usize {
        let Some(cache) = &mut self.deltas else { return 0 };
        let again = PageSet::from_bitmaps(&PageMap::new(ram), dirty);
        cache.retain(|i| again.contains(i));
        cache.pages()
    }

    /// The pages queued from now on are the migration's last (the vCPUs are pausing): a
    /// delta no longer updates the cache, it takes the page out (`Cache::encode_last`).
    pub fn sending_last(&mut self) {
        self.last = true;
    }

    /// Sends whole pages from now on, and frees the cache.
    pub fn stop_deltas(&mut self) {
        self.deltas = None;
    }

    /// Switches to post-copy frames (each checked on its own: a post-copy stream may break
    /// and resume, so no running checksum spans it).
    pub fn start_postcopy(&mut self) {
        debug_assert_eq!(self.queued(), 0, "pages queued before post-copy were not flushed");
        self.flush_zero_run();
        self.postcopy = true;
        // Post-copy installs whole pages (UFFDIO_COPY): no deltas, and the cache is freed.
        self.stop_deltas();
        self.data_run = None;
        // Whatever was queued and not flushed is dropped with the frame: runs sent in
        // place too (their offsets point into the old frame).
        self.borrowed.clear();
        self.borrowed_bytes = 0;
        self.frame.clear();
        self.frame.extend_from_slice(&[0; 4]);
    }

    fn frame_header(&self) -> usize {
        if self.postcopy {
            4
        } else {
            0
        }
    }

    /// Queues page `gpa` of a post-copy (non-resident pages go as zeros unread); `flush`
    /// sends what is queued.
    pub fn queue(&mut self, ram: &GuestRam, gpa: u64, resident: bool) -> Result<(), Error> {
        if resident {
            self.page(ram, gpa, false)
        } else {
            self.stats.pages += 1;
            self.zero_page(gpa, false);
            Ok(())
        }
    }

    /// Bytes queued and not yet sent.
    pub fn queued(&self) -> usize {
        self.frame_len() - self.frame_header()
    }

    /// The payload's length, pages sent in place included.
    fn frame_len(&self) -> usize {
        self.frame.len() + self.borrowed_bytes
    }

    /// Sends whatever is queued.
    pub fn flush<W: Write>(&mut self, out: &mut W) -> Result<(), Error> {
        self.maybe_send(out, true)?;
        out.flush().map_err(protocol::Error::from)?;
        Ok(())
    }

    /// Counts `bytes` against the rate cap and sleeps as long as we are ahead of it.
    fn throttle(&self, bytes: u64) {
        if let Some(limit) = &self.limit {
            limit.spend(bytes);
        }
    }

    fn flush_zero_run(&mut self) {
        if let Some((gpa, n, flags)) = self.zero_run.take() {
            self.frame.extend_from_slice(&record_header(gpa, n, flags));
        }
    }

    /// Adds page `gpa` to the data record whose header is at `header_at` (the page's bytes
    /// are queued by the caller).
    fn extend_run(&mut self, header_at: usize, gpa: u64) {
        let count = &mut self.frame[header_at + 8..header_at + 12];
        let pages = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) + 1;
        count.copy_from_slice(&pages.to_le_bytes());
        self.data_run = Some((header_at, gpa + PAGE));
    }

    fn zero_page(&mut self, gpa: u64, fresh: bool) {
        // A zero record now follows the last data record: that one is closed.
        self.data_run = None;
        if let Some(cache) = &mut self.deltas {
            cache.zeroed(gpa);
        }
        self.stats.zero_pages += 1;
        let flags = if fresh { ZERO | FRESH } else { ZERO };
        match &mut self.zero_run {
            Some((start, n, f)) if *f == flags && *start + u64::from(*n) * PAGE == gpa && *n < u32::MAX => *n += 1,
            _ => {
                self.flush_zero_run();
                self.zero_run = Some((gpa, 1, flags));
            }
        }
    }

    /// Reads one page and queues it as data or as a zero record. The page is read straight
    /// into the frame (and taken back out if it is all zeros): one copy less per page.
    fn page(&mut self, ram: &GuestRam, gpa: u64, fresh: bool) -> Result<(), Error> {
        if self.paused.is_some() {
            return self.page_in_place(ram, gpa, fresh);
        }
        self.stats.pages += 1;
        // Right after the data record it extends, the page needs no header of its own.
        let extends = self.data_run.filter(|&(_, next)| next == gpa);
        let at = self.frame.len();
        let data_at = if extends.is_some() { at } else { at + RECORD_HEADER };
        // The header's room (filled in below), then the page appended straight from guest
        // RAM: growing the frame with `resize` first had zeroed every page's room in vain
        // (2.4% of the sender's time in pre-copy rounds).
        self.frame.resize(data_at, 0);
        let page = ram.get_slice(GuestAddress(gpa), PAGE as usize)?;
        vm_memory::WriteVolatile::write_volatile(&mut self.frame, &page)
            .map_err(|_| Error::OutsideRam { gpa, pages: 1 })?;
        if self.frame[data_at..].iter().all(|&b| b == 0) {
            self.frame.truncate(at);
            self.zero_page(gpa, fresh);
            return Ok(());
        }
        if let Some(Encoded::Delta) = encode(&mut self.deltas, self.last, gpa, &self.frame[data_at..]) {
            self.frame.truncate(at);
            self.delta_record(gpa);
            return Ok(());
        }
        if let Some((header_at, _)) = extends {
            self.extend_run(header_at, gpa);
            return Ok(());
        }
        // A pending zero run goes before this page: move the page up by one header.
        if let Some((run_gpa, n, flags)) = self.zero_run.take() {
            self.frame.splice(at..at, record_header(run_gpa, n, flags));
        }
        let at = self.frame.len() - PAGE as usize - RECORD_HEADER;
        self.frame[at..at + RECORD_HEADER].copy_from_slice(&record_header(gpa, 1, 0));
        self.data_run = Some((at, gpa + PAGE));
        Ok(())
    }

    /// Queues page `gpa` as the delta the cache just encoded.
    fn delta_record(&mut self, gpa: u64) {
        self.data_run = None;
        self.flush_zero_run();
        let runs = self.deltas.as_ref().map_or(&[][..], delta::Cache::runs);
        self.frame.extend_from_slice(&record_header(gpa, 1, DELTA));
        self.frame.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        self.frame.extend_from_slice(runs);
        self.stats.delta_pages += 1;
    }

    /// `page` for a paused guest: checks the page where it lies and queues a reference
    /// to it, not a copy.
    fn page_in_place(&mut self, ram: &GuestRam, gpa: u64, fresh: bool) -> Result<(), Error> {
        self.stats.pages += 1;
        // SAFETY: the guest is paused (`guest_paused`'s contract).
        let bytes =
            unsafe { memory::paused_bytes(ram, gpa, PAGE as usize) }.ok_or(Error::OutsideRam { gpa, pages: 1 })?;
        if bytes.iter().all(|&b| b == 0) {
            self.zero_page(gpa, fresh);
            return Ok(());
        }
        if let Some(Encoded::Delta) = encode(&mut self.deltas, self.last, gpa, bytes) {
            self.delta_record(gpa);
            return Ok(());
        }
        // Extends the run at the frame's end, if that run is sent in place (a run copied
        // into the frame before the pause is not) and ends right before this page.
        let frame_len = self.frame.len();
        let extends = self.data_run.filter(|&(header_at, next)| {
            next == gpa
                && self.borrowed.last().is_some_and(|&(at, first, len)| {
                    at == header_at + RECORD_HEADER && at == frame_len && first + len as u64 == gpa
                })
        });
        if let (Some((header_at, _)), Some(last)) = (extends, self.borrowed.last_mut()) {
            // The run's pages are adjacent in one region: adjacent in the mapping too.
            last.2 += PAGE as usize;
            self.borrowed_bytes += PAGE as usize;
            self.extend_run(header_at, gpa);
            return Ok(());
        }
        self.flush_zero_run();
        let at = self.frame.len();
        self.frame.extend_from_slice(&record_header(gpa, 1, 0));
        self.borrowed.push((self.frame.len(), gpa, PAGE as usize));
        self.borrowed_bytes += PAGE as usize;
        self.data_run = Some((at, gpa + PAGE));
        Ok(())
    }

    /// The payload as slices: the frame's own bytes, with the runs sent in place
    /// between them.
    fn payload_slices<'a>(
        frame: &'a [u8],
        borrowed: &[(usize, u64, usize)],
        ram: Option<&'a GuestRam>,
    ) -> Result<Vec<&'a [u8]>, Error> {
        let mut slices = Vec::with_capacity(borrowed.len() * 2 + 1);
        let mut from = 0;
        for &(at, gpa, len) in borrowed {
            slices.push(&frame[from..at]);
            let ram = ram.ok_or(Error::OutsideRam { gpa, pages: 0 })?;
            slices
                // SAFETY: runs are queued only once the guest is paused (`guest_paused`).
                .push(
                    unsafe { memory::paused_bytes(ram, gpa, len) }
                        .ok_or(Error::OutsideRam { gpa, pages: len as u64 / PAGE })?,
                );
            from = at;
        }
        slices.push(&frame[from..]);
        Ok(slices)
    }

    fn maybe_send<W: Write>(&mut self, out: &mut W, force: bool) -> Result<(), Error> {
        if force {
            self.flush_zero_run();
        }
        let header = self.frame_header();
        let len = self.frame_len();
        if len >= FRAME_TARGET || (force && len > header) {
            let slices = Self::payload_slices(&self.frame, &self.borrowed, self.paused.as_ref())?;
            let kind = if self.postcopy {
                let mut crc = crc32fast::Hasher::new();
                crc.update(&slices[0][header..]);
                slices[1..].iter().for_each(|s| crc.update(s));
                self.frame[..4].copy_from_slice(&crc.finalize().to_le_bytes());
                Kind::PostcopyPages
            } else {
                slices.iter().for_each(|s| self.crc.update(s));
                Kind::Memory
            };
            // The CRC went into the frame's first bytes: take the slices anew.
            let slices = Self::payload_slices(&self.frame, &self.borrowed, self.paused.as_ref())?;
            let packed = self.packer.pack(&slices, len);
            let start = std::time::Instant::now();
            let wire_bytes = match packed {
                Some(packed) => {
                    let kind = if self.postcopy { Kind::PostcopyPagesLz4 } else { Kind::MemoryLz4 };
                    protocol::write_frame(out, kind, packed)?;
                    self.stats.compressed_frames += 1;
                    self.stats.compression_saved += (len - packed.len()) as u64;
                    packed.len()
                }
                None => {
                    protocol::write_frame_vectored(out, kind, &slices)?;
                    len
                }
            };
            self.stats.bytes_on_wire += wire_bytes as u64 + 16;
            self.throttle(wire_bytes as u64 + 16);
            // The link's pace includes `--max-bandwidth`'s: a capped link is a slow one.
            let compressed = wire_bytes != len;
            self.packer.sent(compress::Sent { compressed, wire_bytes, took: start.elapsed() });
            self.frame.truncate(header);
            self.borrowed.clear();
            self.borrowed_bytes = 0;
            self.data_run = None;
        }
        Ok(())
    }

    /// The first full pass: every page of RAM; non-resident pages without reading them.
    pub fn send_all<W: Write>(&mut self, ram: &GuestRam, out: &mut W) -> Result<(), Error> {
        self.send_all_until(ram, out, &mut |_| false).map(|_| ())
    }

    /// `send_all` that asks `stop`, every [`STOP_CHECK`] pages, whether to end early (it
    /// gets the pages of data sent so far). Returns how many pages, counted region by
    /// region as `PageMap` does, were sent (all of RAM unless it stopped); the ones
    /// before that point are all on the wire.
    pub fn send_all_until<W: Write>(
        &mut self,
        ram: &GuestRam,
        out: &mut W,
        stop: &mut dyn FnMut(u64) -> bool,
    ) -> Result<u64, Error> {
        let mut covered = 0;
        'regions: for region in ram.iter() {
            // A record never spans two regions (they are not adjacent, but a run must not
            // rely on that).
            self.data_run = None;
            let base = region.start_addr().0;
            let resident = residency(region.as_ptr(), region.len() as usize);
            for (i, present) in resident.iter().enumerate() {
                if covered % STOP_CHECK == STOP_CHECK - 1 && stop(self.stats.pages - self.stats.zero_pages) {
                    break 'regions;
                }
                let gpa = base + i as u64 * PAGE;
                if *present {
                    self.page(ram, gpa, true)?;
                } else {
                    self.stats.pages += 1;
                    self.zero_page(gpa, true);
                }
                covered += 1;
                self.maybe_send(out, false)?;
            }
        }
        self.maybe_send(out, true)?;
        out.flush().map_err(protocol::Error::from)?;
        Ok(covered)
    }

    /// A later round: the pages set in `dirty` (one bitmap per RAM region). Returns how
    /// many pages it sent.
    pub fn send_dirty<W: Write>(&mut self, ram: &GuestRam, dirty: &[Vec<u64>], out: &mut W) -> Result<u64, Error> {
        let mut sent = 0;
        for (region, bits) in ram.iter().zip(dirty) {
            self.data_run = None; // as in `send_all`
            let base = region.start_addr().0;
            let pages = region.len() / PAGE;
            for index in super::pages::set_bits(bits).take_while(|&index| index < pages) {
                self.page(ram, base + index * PAGE, false)?;
                sent += 1;
                self.maybe_send(out, false)?;
            }
        }
        self.maybe_send(out, true)?;
        out.flush().map_err(protocol::Error::from)?;
        Ok(sent)
    }

    /// CRC32 of every Memory payload sent so far.
    pub fn crc32(&self) -> u32 {
        self.crc.clone().finalize()
    }
}

/// Encodes page `gpa` against the delta cache, if there is one; `last`: see
/// `Outgoing::sending_last`.
fn encode(cache: &mut Option<delta::Cache>, last: bool, gpa: u64, bytes: &[u8]) -> Option<Encoded> {
    cache.as_mut().map(|c| if last { c.encode_last(gpa, bytes) } else { c.encode(gpa, bytes) })
}

/// A record header: `gpa u64 | npages u32 | flags u32`, little endian.
fn record_header(gpa: u64, pages: u32, flags: u32) -> [u8; RECORD_HEADER] {
    let mut header = [0u8; RECORD_HEADER];
    header[..8].copy_from_slice(&gpa.to_le_bytes());
    header[8..12].copy_from_slice(&pages.to_le_bytes());
    header[12..].copy_from_slice(&flags.to_le_bytes());
    header
}

/// CRC32 of all guest RAM (test mode: proves both sides hold the same bytes).
pub fn ram_crc32(ram: &GuestRam) -> Result<u32, Error> {
    let mut crc = crc32fast::Hasher::new();
    let mut chunk = vec![0u8; 1 << 20];
    for region in ram.iter() {
        let base = region.start_addr().0;
        let mut offset = 0;
        while offset < region.len() {
            let len = chunk.len().min((region.len() - offset) as usize);
            ram.read_slice(&mut chunk[..len], GuestAddress(base + offset))?;
            crc.update(&chunk[..len]);
            offset += len as u64;
        }
    }
    Ok(crc.finalize())
}

/// Counts the pages set in per-region dirty bitmaps.
pub fn count_dirty(dirty: &[Vec<u64>]) -> u64 {
    dirty.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
}

/// One page record, checked against guest RAM.
pub struct Record<'a> {
    pub gpa: u64,
    pub pages: u64,
    pub flags: u32,
    /// The pages' bytes (empty for a ZERO record).
    pub data: &'a [u8],
}

impl Record<'_> {
    pub fn is_zero(&self) -> bool {
        self.flags & ZERO != 0
    }

    /// A delta of one page (`data`: its runs, checked) to write over what the page holds.
    pub fn is_delta(&self) -> bool {
        self.flags & DELTA != 0
    }
}

/// The records of a Memory (or PostcopyPages) payload, each checked: aligned, non-empty,
/// inside one RAM region, known flags, all its bytes present.
pub fn records<'a>(ram: &'a GuestRam, payload: &'a [u8]) -> impl Iterator<Item = Result<Record<'a>, Error>> + 'a {
    let mut rest = payload;
    let mut failed = false;
    std::iter::from_fn(move || {
        if rest.is_empty() || failed {
            return None;
        }
        let record = next_record(ram, &mut rest);
        failed = record.is_err();
        Some(record)
    })
}

fn next_record<'a>(ram: &GuestRam, rest: &mut &'a [u8]) -> Result<Record<'a>, Error> {
    let header = rest.get(..RECORD_HEADER).ok_or_else(|| Error::Record("truncated record header".into()))?;
    let Record { gpa, pages, flags, .. } = record_header_checked(ram, header)?;
    *rest = &rest[RECORD_HEADER..];
    if flags & ZERO != 0 {
        return Ok(Record { gpa, pages, flags, data: &[] });
    }
    if flags == DELTA {
        return next_delta(gpa, pages, rest);
    }
    let len = (pages * PAGE) as usize;
    let data = rest.get(..len).ok_or_else(|| Error::Record("record data past the frame".into()))?;
    *rest = &rest[len..];
    Ok(Record { gpa, pages, flags, data })
}

/// A record's header (`RECORD_HEADER` bytes), checked: aligned, non-empty, inside one RAM
/// region, known flags. Its `data` is empty: for a receiver that reads the data itself.
pub fn record_header_checked<'a>(ram: &GuestRam, header: &[u8]) -> Result<Record<'a>, Error> {
    let field = |at: usize, len: usize| header.get(at..at + len).ok_or_else(|| Error::Record("short header".into()));
    let gpa = u64::from_le_bytes(field(0, 8)?.try_into().unwrap_or([0; 8]));
    let pages = u64::from(u32::from_le_bytes(field(8, 4)?.try_into().unwrap_or([0; 4])));
    let flags = u32::from_le_bytes(field(12, 4)?.try_into().unwrap_or([0; 4]));
    let len = pages.checked_mul(PAGE).ok_or(Error::OutsideRam { gpa, pages })?;
    if gpa % PAGE != 0 || pages == 0 || !memory::is_ram(ram, gpa, len) {
        return Err(Error::OutsideRam { gpa, pages });
    }
    if (flags & !(ZERO | FRESH) != 0 && flags != DELTA) || flags == FRESH {
        return Err(Error::Record(format!("unknown flags {flags:#x}")));
    }
    Ok(Record { gpa, pages, flags, data: &[] })
}

/// The rest of a DELTA record: `len u32` and the runs, checked.
fn next_delta<'a>(gpa: u64, pages: u64, rest: &mut &'a [u8]) -> Result<Record<'a>, Error> {
    if pages != 1 {
        return Err(Error::Record(format!("a delta covers one page, not {pages}")));
    }
    let len = rest.get(..4).ok_or_else(|| Error::Record("truncated delta length".into()))?;
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let data = rest.get(4..4 + len.min(DELTA_MAX_LEN)).filter(|d| d.len() == len);
    let data = data.ok_or_else(|| Error::Record("delta data past the frame".into()))?;
    delta::check(data).map_err(|e| Error::Record(e.to_string()))?;
    *rest = &rest[4 + len..];
    Ok(Record { gpa, pages, flags: DELTA, data })
}

/// Faults in `[gpa, gpa + len)` (checked to lie inside one RAM region) with one
/// `MADV_POPULATE_WRITE`, which costs far less than a first-touch fault a page (a trap
/// each, ~9 us on this project's test host). Best effort: kernels before 5.14 refuse it,
/// and the copy then faults the pages in as usual.
fn populate_ram(ram: &GuestRam, gpa: u64, len: u64) {
    if !memory::is_ram(ram, gpa, len) {
        return;
    }
    if let Ok(host) = ram.get_host_address(GuestAddress(gpa)) {
        // SAFETY: advice on `len` bytes of a live guest RAM mapping (checked above to lie
        // in one region); it writes nothing the guest could see (pages stay zero).
        unsafe {
            libc::madvise(host.cast(), len as usize, 23 /* MADV_POPULATE_WRITE */)
        };
    }
}

/// What a receiver knows of the pages that arrived.
pub struct Arrived {
    map: PageMap,
    /// Every page some record covered (and not dropped since): a hybrid migration's
    /// destination has these.
    pub received: PageSet,
    /// Every page data was written to: faulted in (no need to advise it again) and,
    /// in prepared RAM, possibly not zero.
    pub populated: PageSet,
}

impl Arrived {
    fn new(ram: &GuestRam) -> Arrived {
        let map = PageMap::new(ram);
        let (received, populated) = (PageSet::new(map.total()), PageSet::new(map.total()));
        Arrived { map, received, populated }
    }

    /// Page `record` starts at (records are checked to lie in RAM).
    fn first(&self, record: &Record) -> u64 {
        self.map.index_of_gpa(record.gpa).unwrap_or(u64::MAX)
    }

    fn mark(&self, record: &Record) {
        let first = self.first(record);
        for i in first..first.saturating_add(record.pages) {
            self.received.insert(i);
            if !record.is_zero() {
                self.populated.insert(i);
            }
        }
    }
}

/// Writes a delta's runs over the page it is for, which must have arrived before.
fn apply_delta(
    ram: &GuestRam,
    target: Option<(&memory::Prepared, usize)>,
    arrived: Option<&Arrived>,
    record: &Record,
) -> Result<(), Error> {
    if !arrived.is_some_and(|a| a.received.contains(a.first(record))) {
        return Err(Error::Record(format!("a delta for page {:#x}, which never arrived", record.gpa)));
    }
    // The record's runs were checked whole when it was parsed (`next_delta`).
    for run in delta::runs(record.data) {
        let (offset, bytes) = run.map_err(|e| Error::Record(e.to_string()))?;
        match target {
            Some((p, page)) => {
                p.write(page + offset, bytes);
            }
            None => write_ram(ram, record.gpa + offset as u64, bytes)?,
        }
    }
    Ok(())
}

/// Copies `data` into guest RAM at `gpa` (already checked to lie in one region) with a
/// plain memcpy: the destination's vCPUs do not run while memory arrives, so nothing
/// races the copy, and vm-memory's volatile, dirty-tracking path is several times slower.
fn write_ram(ram: &GuestRam, gpa: u64, data: &[u8]) -> Result<(), Error> {
    use vm_memory::GuestMemoryBackend;
    let host = ram.get_host_address(GuestAddress(gpa))?;
    // SAFETY: `is_ram` checked `[gpa, gpa + data.len())` lies inside one mapped region, so
    // `host` points to at least `data.len()` writable bytes; no vCPU runs yet on the
    // destination, and `data` is our own buffer, so the ranges cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, data.len()) };
    Ok(())
}

/// The receiving side of memory transfer: applies Memory payloads as they come and, at
/// Complete, checks the stream's CRC32 (and, in test mode, the CRC32 of all of RAM).
#[derive(Default)]
pub struct Incoming {
    crc: crc32fast::Hasher,
    pub stats: Transfer,
    /// Set up with the first payload.
    arrived: Option<Arrived>,
    /// RAM prepared ahead, written through its second mapping (not with post-copy, whose
    /// delivered pages must be mapped for the guest already).
    prepared: Option<std::sync::Arc<memory::Prepared>>,
    /// Where compressed frames are decompressed (kept: the same pages serve every frame).
    unpacked: Vec<u8>,
    /// A delta record's runs, as they are read.
    scratch: Vec<u8>,
    /// `FrameReader`'s buffer.
    read_ahead: Vec<u8>,
}

/// What a `FrameReader` reads ahead for small reads.
const READ_AHEAD: usize = 64 << 10;

/// Reads one frame's payload: reads shorter than [`READ_AHEAD`] (record headers, deltas)
/// come out of a buffer filled up to at most the frame's end, so that a frame of deltas
/// costs a few system calls, not three a page; longer ones (page data) go straight to the
/// caller's memory when nothing is buffered.
struct FrameReader<'a, R: std::io::Read + ?Sized> {
    inner: &'a mut R,
    /// Bytes of the frame not yet read from `inner`.
    left: u64,
    buffer: &'a mut Vec<u8>,
    /// `buffer[at..end]` is read and not yet handed out.
    at: usize,
    end: usize,
}

impl<R: std::io::Read + ?Sized> std::io::Read for FrameReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.end {
            let direct = out.len() >= READ_AHEAD;
            let want = (if direct { out.len() } else { READ_AHEAD } as u64).min(self.left) as usize;
            if want == 0 {
                return Ok(0);
            }
            if direct {
                let got = self.inner.read(&mut out[..want])?;
                self.left -= got as u64;
                return Ok(got);
            }
            if self.buffer.len() < READ_AHEAD {
                self.buffer.resize(READ_AHEAD, 0);
            }
            let got = self.inner.read(&mut self.buffer[..want])?;
            self.left -= got as u64;
            (self.at, self.end) = (0, got);
        }
        let n = out.len().min(self.end - self.at);
        out[..n].copy_from_slice(&self.buffer[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Incoming {
    /// A receiver that writes through `prepared`'s second mapping.
    pub fn into_prepared(prepared: std::sync::Arc<memory::Prepared>) -> Incoming {
        Incoming { prepared: Some(prepared), ..Default::default() }
    }

    /// Applies one Memory payload held in memory.
    pub fn memory(&mut self, ram: &GuestRam, payload: &[u8]) -> Result<(), Error> {
        self.stats.bytes_on_wire += payload.len() as u64 + 16;
        self.apply(ram, payload)
    }

    /// Reads the `len`-byte payload of a Memory frame (its header read already) from
    /// `stream` and applies it record by record: page data goes from the socket straight
    /// into guest RAM (through prepared RAM's second mapping, if any), one copy less than
    /// through a buffer. Guest RAM is the destination's, whose vCPUs do not run yet.
    pub fn read_memory<R: std::io::Read + ?Sized>(
        &mut self,
        ram: &GuestRam,
        stream: &mut R,
        len: u64,
    ) -> Result<(), Error> {
        self.stats.bytes_on_wire += len + 16;
        self.receive(ram, stream, len)
    }

    /// Applies one MemoryLz4 payload (the checksum covers the raw payload).
    pub fn compressed_memory(&mut self, ram: &GuestRam, payload: &[u8]) -> Result<(), Error> {
        self.stats.bytes_on_wire += payload.len() as u64 + 16;
        let mut buffer = std::mem::take(&mut self.unpacked);
        let applied = match compress::unpack(payload, &mut buffer) {
            Ok(raw) => {
                self.stats.compressed_frames += 1;
                self.stats.compression_saved += raw.len().saturating_sub(payload.len()) as u64;
                self.apply(ram, raw)
            }
            Err(e) => Err(e.into()),
        };
        self.unpacked = buffer;
        applied
    }

    fn apply(&mut self, ram: &GuestRam, raw: &[u8]) -> Result<(), Error> {
        self.receive(ram, &mut &raw[..], raw.len() as u64)
    }

    /// Reads `len` bytes of page records from `stream` and applies them as they come,
    /// checking each against RAM (and its data against the frame's end) before reading its
    /// data; the running checksum covers the bytes as read.
    fn receive<R: std::io::Read + ?Sized>(&mut self, ram: &GuestRam, stream: &mut R, len: u64) -> Result<(), Error> {
        use std::io::Read as _;
        let stream = &mut FrameReader { inner: stream, left: len, buffer: &mut self.read_ahead, at: 0, end: 0 };
        let io = |e: std::io::Error| Error::Protocol(e.into());
        let past_the_frame = |what: &str| Error::Record(format!("{what} past the frame"));
        let arrived = self.arrived.get_or_insert_with(|| Arrived::new(ram));
        let prepared = self.prepared.as_deref();
        let (mut rest, mut header) = (len, [0u8; RECORD_HEADER]);
        while rest > 0 {
            rest = rest.checked_sub(RECORD_HEADER as u64).ok_or_else(|| past_the_frame("record header"))?;
            stream.read_exact(&mut header).map_err(io)?;
            self.crc.update(&header);
            let mut record = record_header_checked(ram, &header)?;
            self.stats.pages += record.pages;
            let offset = (arrived.first(&record) * PAGE) as usize;
            let target = prepared.map(|p| (p, offset));
            if record.is_delta() {
                rest = rest.checked_sub(4).ok_or_else(|| past_the_frame("delta length"))?;
                let mut size = [0u8; 4];
                stream.read_exact(&mut size).map_err(io)?;
                self.crc.update(&size);
                let size = u64::from(u32::from_le_bytes(size));
                if size > DELTA_MAX_LEN as u64 || size > rest {
                    return Err(past_the_frame("delta data"));
                }
                rest -= size;
                self.scratch.resize(size as usize, 0);
                stream.read_exact(&mut self.scratch).map_err(io)?;
                self.crc.update(&self.scratch);
                delta::check(&self.scratch).map_err(|e| Error::Record(e.to_string()))?;
                record.data = &self.scratch;
                apply_delta(ram, target, Some(arrived), &record)?;
                self.stats.delta_pages += 1;
            } else if record.is_zero() {
                self.stats.zero_pages += record.pages;
                if record.flags & FRESH == 0 {
                    // A page sent earlier became zero: clear it.
                    match target {
                        Some((p, offset)) => {
                            p.zero(offset, (record.pages * PAGE) as usize);
                        }
                        None => {
                            let zero = [0u8; PAGE as usize];
                            for p in 0..record.pages {
                                ram.write_slice(&zero, GuestAddress(record.gpa + p * PAGE))?;
                            }
                        }
                    }
                }
            } else {
                let bytes = record.pages * PAGE;
                rest = rest.checked_sub(bytes).ok_or_else(|| past_the_frame("record data"))?;
                let data = match target {
                    // SAFETY: the destination's vCPUs do not run while memory arrives, and
                    // nothing else here touches RAM meanwhile.
                    Some((p, offset)) => unsafe { p.read_into(offset, bytes as usize, stream) },
                    None => {
                        // One MADV_POPULATE_WRITE for the run costs far less than a
                        // first-touch fault a page (a trap each, ~9 us on the test host).
                        let first = arrived.first(&record);
                        if !(first..first + record.pages).all(|i| arrived.populated.contains(i)) {
                            populate_ram(ram, record.gpa, bytes);
                        }
                        // SAFETY: as above.
                        unsafe { memory::read_into_ram(ram, record.gpa, bytes as usize, stream) }
                    }
                };
                self.crc.update(data.map_err(io)?);
            }
            arrived.mark(&record);
        }
        Ok(())
    }

    /// Frees what only the transfer needed.
    pub fn release_buffers(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.unpacked)
    }

    /// Allocates the pages of `ranges` now (stop-and-copy's Populate, before the pause),
    /// so the copy in the downtime writes to pages that exist. Prepared RAM exists already.
    pub fn populate(&mut self, ram: &GuestRam, ranges: &[(u64, u64)]) -> Result<(), Error> {
        let arrived = self.arrived.get_or_insert_with(|| Arrived::new(ram));
        let ahead = PageSet::new(arrived.map.total());
        ahead.insert_ranges(&arrived.map, ranges).map_err(Error::Record)?;
        if self.prepared.is_some() {
            return Ok(());
        }
        // Re-derived from the set: contiguous within a region, inside RAM.
        for (gpa, pages) in ahead.ranges(&arrived.map) {
            populate_ram(ram, gpa, pages * PAGE);
        }
        // Faulted in: the receiver does not advise them again. (Post-copy, were a forged stream
        // to switch after this, counts them as possibly written: only conservative.)
        arrived.populated.union(&ahead);
        Ok(())
    }

    /// Pages dropped here again (hybrid's Discard): no longer received, to come again.
    pub fn forget(&mut self, ram: &GuestRam, ranges: &[(u64, u64)]) -> Result<(), Error> {
        let arrived = self.arrived.get_or_insert_with(|| Arrived::new(ram));
        let gone = PageSet::new(arrived.map.total());
        gone.insert_ranges(&arrived.map, ranges).map_err(Error::Record)?;
        arrived.received.subtract(&gone);
        Ok(())
    }

    /// What arrived (none yet: `None`).
    pub fn take_arrived(&mut self) -> Option<Arrived> {
        self.arrived.take()
    }

    /// Checks the Memory payloads so far against the source's CRC32 of them.
    pub fn check_crc32(&mut self, sent: u32) -> Result<(), Error> {
        self.stats.crc32 = self.crc.clone().finalize();
        if sent != self.stats.crc32 {
            return Err(Error::Checksum { received: self.stats.crc32, sent });
        }
        Ok(())
    }

    /// Checks what arrived against the source's Complete message.
    pub fn complete(&mut self, ram: &GuestRam, complete: &protocol::Complete) -> Result<(), Error> {
        self.check_crc32(complete.memory_crc32)?;
        if let Some(expected) = complete.ram_crc32 {
            let here = ram_crc32(ram)?;
            if here != expected {
                return Err(Error::RamDiffers { here, expected });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies one Memory payload as a fresh destination would (checking every record).
    fn apply(ram: &GuestRam, payload: &[u8]) -> Result<(), Error> {
        Incoming::default().memory(ram, payload)
    }

    /// A stream that hands out at most 777 bytes a read, as a socket may.
    struct Dribble<'a>(&'a [u8]);

    impl std::io::Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(777).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Receives the Memory frames of `wire` the way the destination does: headers, then
    /// each payload read record by record from the stream.
    fn read_frames(incoming: &mut Incoming, ram: &GuestRam, wire: &[u8]) -> Result<(), Error> {
        let mut stream = Dribble(wire);
        while !stream.0.is_empty() {
            let (kind, len) = protocol::read_header(&mut stream)?;
            assert_eq!(kind, Kind::Memory);
            incoming.read_memory(ram, &mut stream, len)?;
        }
        Ok(())
    }

    #[test]
    fn the_resident_pages_are_allocated_ahead_and_stay_zero() {
        let src = memory::create_ram(16 << 20).unwrap();
        src.write_slice(b"hello", GuestAddress(0x5000)).unwrap();
        src.write_slice(&[7u8; 8192], GuestAddress(0x80_0000)).unwrap();
        let ranges = resident_ranges(&src);
        assert_eq!(ranges, vec![(0x5000, 1), (0x80_0000, 2)]);
        let dst = memory::create_ram(16 << 20).unwrap();
        let mut incoming = Incoming::default();
        incoming.populate(&dst, &ranges).unwrap();
        // Allocated (resident) now, and still zero: nothing the guest could see changed.
        assert_eq!(resident_ranges(&dst), ranges);
        assert_eq!(ram_crc32(&dst).unwrap(), ram_crc32(&memory::create_ram(16 << 20).unwrap()).unwrap());
        // A range outside RAM is refused, not advised.
        let err = incoming.populate(&dst, &[(1 << 40, 1)]).unwrap_err();
        assert!(err.to_string().contains("outside guest RAM"), "{err}");
    }

    #[test]
    fn populate_messages_are_bounded_in_ranges_and_pages() {
        // 3 GiB in one range: three messages of 1 GiB, contiguous, nothing lost.
        let big = populate_messages(&[(0x1_0000_0000, 3 << 18)]);
        assert_eq!(big.len(), 3);
        assert!(big.iter().all(|m| m.len() == 1 && m[0].1 == POPULATE_PAGES));
        assert_eq!(big[1][0].0, 0x1_0000_0000 + (1 << 30));
        // 100,000 single pages: 65,536 ranges, then the rest.
        let scattered: Vec<(u64, u64)> = (0..100_000u64).map(|i| (i * 2 * PAGE, 1)).collect();
        let messages = populate_messages(&scattered);
        assert_eq!(messages.iter().map(Vec::len).collect::<Vec<_>>(), vec![POPULATE_RANGES, 100_000 - POPULATE_RANGES]);
        assert_eq!(messages.concat(), scattered);
        assert!(populate_messages(&[]).is_empty());
    }

    #[test]
    fn round_trip_and_hostile_records() {
        let src = memory::create_ram(16 << 20).unwrap();
        src.write_slice(b"hello", GuestAddress(0x5000)).unwrap();
        src.write_slice(&[7u8; 4096], GuestAddress(0x80_0000)).unwrap();
        let mut wire = Vec::new();
        let mut outgoing = Outgoing::default();
        outgoing.send_all(&src, &mut wire).unwrap();
        let complete = protocol::Complete {
            memory_crc32: outgoing.crc32(),
            pages_sent: outgoing.stats.pages,
            zero_pages: outgoing.stats.zero_pages,
            ram_crc32: Some(ram_crc32(&src).unwrap()),
            state_crc32: None,
        };
        assert_eq!(outgoing.stats.pages, 4096);
        assert_eq!(outgoing.stats.zero_pages, 4094);
        // Receives `wire` into fresh RAM the way the destination does.
        let receive = |wire: &[u8]| -> Result<(GuestRam, Transfer), Error> {
            let dst = memory::create_ram(16 << 20).unwrap();
            let mut incoming = Incoming::default();
            read_frames(&mut incoming, &dst, wire)?;
            incoming.complete(&dst, &complete)?;
            Ok((dst, incoming.stats))
        };
        let (dst, got) = receive(&wire).unwrap();
        assert_eq!(got.pages, 4096);
        let mut buf = [0u8; 5];
        dst.read_slice(&mut buf, GuestAddress(0x5000)).unwrap();
        assert_eq!(&buf, b"hello");
        // Records pointing outside RAM, truncated, or unaligned are refused.
        let mut rec = Vec::new();
        rec.extend_from_slice(&(64u64 << 20).to_le_bytes());
        rec.extend_from_slice(&1u32.to_le_bytes());
        rec.extend_from_slice(&ZERO.to_le_bytes());
        assert!(matches!(apply(&dst, &rec), Err(Error::OutsideRam { .. })));
        assert!(matches!(apply(&dst, &rec[..10]), Err(Error::Record(_))));
        let mut rec = Vec::new();
        rec.extend_from_slice(&0x1000u64.to_le_bytes());
        rec.extend_from_slice(&2u32.to_le_bytes());
        rec.extend_from_slice(&0u32.to_le_bytes());
        rec.extend_from_slice(&[1u8; 4096]);
        assert!(matches!(apply(&dst, &rec), Err(Error::Record(_))), "data shorter than announced");
        // A corrupted stream fails the checksum.
        let mut bad = wire.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0xff;
        assert!(receive(&bad).is_err());
    }

    #[test]
    fn a_first_pass_stopped_early_sends_every_page_before_the_stop_and_none_after() {
        let src = memory::create_ram(16 << 20).unwrap();
        src.write_slice(&[3u8; 4096], GuestAddress(0x1000)).unwrap();
        src.write_slice(&[5u8; 4096], GuestAddress(0xf0_0000)).unwrap();
        let mut outgoing = Outgoing::default();
        let mut wire = Vec::new();
        let mut asked = Vec::new();
        let covered = outgoing
            .send_all_until(&src, &mut wire, &mut |sent| {
                asked.push(sent);
                asked.len() == 2
            })
            .unwrap();
        // Asked every STOP_CHECK pages with the data pages sent so far; stopped at the second.
        assert_eq!(asked, vec![1, 1]);
        assert_eq!(covered, 2 * STOP_CHECK - 1);
        assert_eq!(outgoing.stats.pages, covered);
        let dst = memory::create_ram(16 << 20).unwrap();
        let mut incoming = Incoming::default();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let (_, payload) = protocol::read_frame(&mut rest).unwrap();
            incoming.memory(&dst, &payload).unwrap();
        }
        assert_eq!(incoming.stats.pages, covered);
        let mut page = [0u8; 4096];
        dst.read_slice(&mut page, GuestAddress(0x1000)).unwrap();
        assert_eq!(page, [3u8; 4096]);
        dst.read_slice(&mut page, GuestAddress(0xf0_0000)).unwrap();
        assert_eq!(page, [0u8; 4096], "past the stop: not sent");
        // Never stopped: all of RAM.
        let mut all = Outgoing::default();
        assert_eq!(all.send_all_until(&src, &mut Vec::new(), &mut |_| false).unwrap(), 4096);
    }

    #[test]
    fn pages_sent_in_place_make_the_same_stream() {
        let src = memory::create_ram(16 << 20).unwrap();
        for page in [0x100u64, 0x101, 0x102, 0x104, 0x900, 0xfff] {
            src.write_slice(&[page as u8 | 1; 4096], GuestAddress(page * PAGE)).unwrap();
        }
        let stream = |paused: bool, postcopy: bool| {
            let mut outgoing = Outgoing::default();
            if paused {
                // SAFETY: no vCPU runs in this test.
                unsafe { outgoing.guest_paused(&src) };
            }
            let mut wire = Vec::new();
            if postcopy {
                outgoing.start_postcopy();
                for page in [0x0fffu64, 0x100, 0x101, 0x103, 0x104, 0x102, 0x900] {
                    outgoing.queue(&src, page * PAGE, true).unwrap();
                }
                outgoing.flush(&mut wire).unwrap();
            } else {
                outgoing.send_all(&src, &mut wire).unwrap();
            }
            (wire, outgoing.crc32(), outgoing.stats.bytes_on_wire)
        };
        for postcopy in [false, true] {
            let (copied, in_place) = (stream(false, postcopy), stream(true, postcopy));
            assert!(copied.0.len() > 6 * 4096);
            assert_eq!(copied, in_place, "post-copy: {postcopy}");
        }
    }

    #[test]
    fn pages_sent_again_go_as_deltas_and_arrive_whole() {
        let src = memory::create_ram(16 << 20).unwrap();
        for page in 0x100u64..0x110 {
            src.write_slice(&[page as u8; 4096], GuestAddress(page * PAGE)).unwrap();
        }
        let dirty = |pages: &[u64]| {
            let mut bits = vec![vec![0u64; 4096 / 64]];
            pages.iter().for_each(|&p| bits[0][p as usize / 64] |= 1 << (p % 64));
            bits
        };
        let mut outgoing = Outgoing::default();
        let mut wire = Vec::new();
        outgoing.send_all(&src, &mut wire).unwrap();
        outgoing.start_deltas(&src, 8 * PAGE);
        // Round 1: whole pages (not cached before), now cached, the first 8 of them.
        let round: Vec<u64> = (0x100..0x110).collect();
        outgoing.send_dirty(&src, &dirty(&round), &mut wire).unwrap();
        assert_eq!(outgoing.stats.delta_pages, 0);
        // The guest stamps each page; one cached page becomes zero, one all new.
        for &page in &round {
            src.write_slice(&page.to_le_bytes(), GuestAddress(page * PAGE + 64)).unwrap();
        }
        src.write_slice(&[0u8; 4096], GuestAddress(0x101 * PAGE)).unwrap();
        src.write_slice(&[0xeeu8; 4096], GuestAddress(0x102 * PAGE)).unwrap();
        let before = wire.len();
        outgoing.send_dirty(&src, &dirty(&round), &mut wire).unwrap();
        // 6 cached pages changed by a word: deltas; 8 uncached and the new one whole.
        assert_eq!(outgoing.stats.delta_pages, 6);
        assert!(wire.len() - before < 9 * 4096 + 512, "{} bytes", wire.len() - before);
        // And once more after the zero page came back to life: a full page, then deltas.
        src.write_slice(&[9u8; 8], GuestAddress(0x101 * PAGE)).unwrap();
        outgoing.send_dirty(&src, &dirty(&[0x101, 0x103]), &mut wire).unwrap();
        assert_eq!(outgoing.stats.delta_pages, 8, "both against cached copies (zeros for 0x101)");
        for prepared in [false, true] {
            let (dst, mut incoming) = if prepared {
                let prepared = std::sync::Arc::new(memory::Prepared::new(16 << 20).unwrap());
                (prepared.ram.clone(), Incoming::into_prepared(prepared))
            } else {
                (memory::create_ram(16 << 20).unwrap(), Incoming::default())
            };
            read_frames(&mut incoming, &dst, &wire).unwrap();
            incoming.check_crc32(outgoing.crc32()).unwrap();
            assert_eq!(incoming.stats.delta_pages, 8);
            assert_eq!(ram_crc32(&dst).unwrap(), ram_crc32(&src).unwrap(), "prepared: {prepared}");
        }
        // A delta for a page the destination never received is refused, as is one in
        // a payload applied without that knowledge.
        let mut rec = record_header(0x200 * PAGE, 1, DELTA).to_vec();
        rec.extend_from_slice(&12u32.to_le_bytes());
        rec.extend_from_slice(&[0, 0, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        let dst = memory::create_ram(16 << 20).unwrap();
        let err = Incoming::default().memory(&dst, &rec).unwrap_err();
        assert!(err.to_string().contains("never arrived"), "{err}");
        assert!(apply(&dst, &rec).is_err());
        // Malformed: two pages, a length past the frame, a run past the page.
        let mut two = rec.clone();
        two[8] = 2;
        let mut long = rec.clone();
        long[16] = 13;
        let mut outside = rec.clone();
        outside[20..22].copy_from_slice(&4092u16.to_le_bytes());
        for bad in [two, long, outside] {
            assert!(matches!(records(&dst, &bad).next(), Some(Err(Error::Record(_)))));
        }
    }

    #[test]
    fn adjacent_pages_share_a_record() {
        let src = memory::create_ram(16 << 20).unwrap();
        for (page, byte) in [(0x100u64, 1u8), (0x101, 2), (0x102, 3), (0x104, 4), (0x105, 5)] {
            src.write_slice(&[byte; 4096], GuestAddress(page * PAGE)).unwrap();
        }
        let mut outgoing = Outgoing::default();
        for page in [0x100u64, 0x101, 0x102, 0x103, 0x104, 0x105, 0x101] {
            outgoing.page(&src, page * PAGE, false).unwrap();
        }
        let mut wire = Vec::new();
        outgoing.flush(&mut wire).unwrap();
        let (_, payload) = protocol::read_frame(&mut wire.as_slice()).unwrap();
        let layout: Vec<(u64, u64, bool)> =
            records(&src, &payload).map(|r| r.map(|r| (r.gpa / PAGE, r.pages, r.is_zero())).unwrap()).collect();
        // A zero page ends a run; a page out of order starts a new one.
        assert_eq!(layout, [(0x100, 3, false), (0x103, 1, true), (0x104, 2, false), (0x101, 1, false)]);
        let dst = memory::create_ram(16 << 20).unwrap();
        apply(&dst, &payload).unwrap();
        assert_eq!(ram_crc32(&dst).unwrap(), ram_crc32(&src).unwrap());
    }
}
