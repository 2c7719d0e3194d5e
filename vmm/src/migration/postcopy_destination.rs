//! Post-copy, destination side: the VM runs before its memory has arrived. Guest RAM is
//! registered with userfaultfd (missing-page mode) before anything can touch it; a fault
//! thread turns each fault on a page still to come into a request to the source, and a
//! receiver thread installs the pages the source sends (requested ones first, then its
//! background push) atomically with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`, which also wakes the
//! faulting thread (a vCPU inside KVM, or a device thread of the VMM). If the link breaks,
//! the guest waits on its missing pages while this side listens again for the source.

use super::auth::Key;
use super::compress;
use super::memory;
use super::pages::{PageMap, PageSet, PAGE};
use super::protocol::{self, Done, Kind, Missing, Resume, Running};
use super::source::chain;
use super::transport::{self, Address, LowWater, Stream};
use crate::memory::GuestRam;
use crate::memory::Prepared;
use crate::parked::Parked;
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use userfaultfd::{Event, RegisterMode, Uffd, UffdBuilder};

/// How to find the source again after a broken link.
pub struct Recovery {
    /// The listener the migration came in on, kept for the source's reconnection.
    pub listener: transport::Listener,
    pub address: Address,
    pub auth_key: Option<Key>,
    pub migration_id: u64,
    pub timeout: Duration,
}

/// What a post-copy needs that can be made before the source pauses: the userfaultfd (not
/// yet watching anything) and its three threads, parked until the switch (made at the
/// switch, they added ~0.4 ms to the downtime), and the page sets, allocated and touched
/// (made at the switch, those of a 1 GiB guest took 55-70 us of it).
pub struct Ahead {
    uffd: Uffd,
    faults: Parked,
    urgent: Parked,
    receiver: Parked,
    map: PageMap,
    /// Every page, to become the pages still needed.
    need: PageSet,
    /// Empty, to become `Shared::touched` and `Shared::claimed`.
    touched: PageSet,
    claimed: PageSet,
}

impl Ahead {
    /// Post-copy's threads on this side, to be handed to `Ahead::new`.
    pub fn threads() -> Result<[Parked; 3], String> {
        let spawn = |name| Parked::spawn(name).map_err(|e| chain(&Error::Thread(e)));
        Ok([spawn("postcopy-faults")?, spawn("postcopy-urgent")?, spawn("postcopy-receiver")?])
    }

    /// `ram`: the guest RAM the pages will come into; `prepared`: whether it was allocated
    /// ahead (minor faults need a kernel feature); `threads`: from `Ahead::threads`.
    pub fn new(ram: &GuestRam, prepared: bool, threads: [Parked; 3]) -> Result<Ahead, String> {
        let mut builder = UffdBuilder::new();
        builder.close_on_exec(true).non_blocking(true).user_mode_only(false);
        if prepared {
            // UFFD_FEATURE_MINOR_SHMEM (Linux 5.14), which this version of the crate does
            // not name.
            builder.require_features(userfaultfd::FeatureFlags::from_bits_retain(1 << 10));
        }
        let uffd = builder.create().map_err(|e| chain(&Error::Create(e)))?;
        let map = PageMap::new(ram);
        let total = map.total();
        let [faults, urgent, receiver] = threads;
        let ahead = Ahead {
            map,
            need: PageSet::full(total),
            touched: PageSet::new(total),
            claimed: PageSet::new(total),
            uffd,
            faults,
            urgent,
            receiver,
        };
        // Up before Accept: the source pauses soon after it, and threads still starting
        // would compete with its pause for the CPU.
        for thread in [&ahead.faults, &ahead.urgent, &ahead.receiver] {
            thread.wait_ready();
        }
        Ok(ahead)
    }
}

/// State both post-copy threads share.
struct Shared {
    uffd: Uffd,
    map: PageMap,
    /// Pages still to come from the source (removed once installed).
    need: PageSet,
    /// Pages a receiver has taken on to install (see `install`).
    claimed: PageSet,
    /// Pages whose memory here is not zero (pre-copy wrote them): a zero page from the
    /// source must be written as zeros there (prepared RAM only).
    touched: PageSet,
    /// RAM allocated ahead: install by writing it and mapping it (UFFDIO_CONTINUE).
    prepared: Option<Arc<Prepared>>,
    /// Pages asked for and not yet installed, with when they were asked for.
    pending: Mutex<HashMap<u64, Instant>>,
    latencies_us: Mutex<Vec<u64>>,
    /// Where the final Done (and requests, without an urgent channel) go; `None` while
    /// the link is down.
    writer: Mutex<Option<Box<dyn Stream>>>,
    /// The urgent channel: requests go here first, past the push; `None` once it broke.
    urgent: Mutex<Option<Box<dyn Stream>>>,
    finished: AtomicBool,
    faults: AtomicU64,
    requested: AtomicU64,
    received: AtomicU64,
    local_zero: AtomicU64,
}

/// A running post-copy.
pub struct Postcopy {
    shared: Arc<Shared>,
    /// The receiver's outcome, sent when it ends (a receiver that panicked drops it).
    receiver: std::sync::mpsc::Receiver<Result<Done, String>>,
}

/// Post-copy errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("userfaultfd is not available (root or vm.unprivileged_userfaultfd=1 is needed)")]
    Create(#[source] userfaultfd::Error),
    #[error("Cannot register guest RAM with userfaultfd")]
    Register(#[source] userfaultfd::Error),
    #[error("Cannot start a post-copy thread")]
    Thread(#[source] std::io::Error),
    #[error("Cannot split the migration connection")]
    Clone(#[source] std::io::Error),
}

impl Postcopy {
    /// Drops the discarded pages, registers all of guest RAM and starts the fault and
    /// receiver threads. `have` holds the pages pre-copy already delivered (none in pure
    /// post-copy); everything else, and everything discarded, will come from the source.
    /// `arrived`: what pre-copy delivered (none in pure post-copy; hybrid's Discard took
    /// its pages out again); `prepared`: RAM allocated ahead (`--prealloc`), filled through
    /// its second mapping and mapped for the guest with minor faults, instead of
    /// missing-page faults.
    pub fn start(
        ram: &GuestRam,
        (stream, urgent): (Box<dyn Stream>, Option<Box<dyn Stream>>),
        arrived: Option<memory::Arrived>,
        (discard, prepared): (&[(u64, u64)], Option<Arc<Prepared>>),
        (recovery, ahead): (Recovery, Ahead),
    ) -> Result<Postcopy, String> {
        let Ahead { uffd, faults, urgent: urgent_thread, receiver, map, need, touched, claimed } = ahead;
        // `touched`: pages that may hold something other than zeros here (pre-copy wrote them).
        if let Some(arrived) = &arrived {
            need.subtract(&arrived.received);
            touched.union(&arrived.populated);
        }
        need.insert_ranges(&map, discard)?;
        touched.insert_ranges(&map, discard)?;
        drop_pages(&map, discard)?;
        let mode = if prepared.is_some() { RegisterMode::MINOR } else { RegisterMode::MISSING };
        for region in vm_memory::GuestMemoryBackend::iter(ram) {
            use vm_memory::GuestMemoryRegion;
            uffd.register_with_mode(region.as_ptr().cast(), region.len() as usize, mode)
                .map_err(|e| chain(&Error::Register(e)))?;
        }
        // The main connection keeps the kernel's buffer sizing (see `postcopy_source::open_link`);
        // only the urgent channel's are capped.
        let writer = stream.try_clone_stream().map_err(|e| chain(&Error::Clone(e)))?;
        let shared = Arc::new(Shared {
            uffd,
            map,
            need,
            claimed,
            touched,
            prepared,
            pending: Mutex::new(HashMap::new()),
            latencies_us: Mutex::new(Vec::new()),
            writer: Mutex::new(Some(writer)),
            urgent: Mutex::new(None),
            finished: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            received: AtomicU64::new(0),
            local_zero: AtomicU64::new(0),
        });
        let s = shared.clone();
        faults.run(move || fault_loop(&s))?;
        if let Some(urgent) = urgent {
            urgent.limit_buffers(super::postcopy_source::POSTCOPY_BUFFERS);
            let writer = urgent.try_clone_stream().map_err(|e| chain(&Error::Clone(e)))?;
            *lock(&shared.urgent) = Some(writer);
            let (s, ram) = (shared.clone(), ram.clone());
            urgent_thread.run(move || receive_urgent(&s, &ram, urgent))?;
        }
        let (s, ram) = (shared.clone(), ram.clone());
        let receiver = receiver.run(move || receive_loop(&s, &ram, stream, &recovery))?;
        Ok(Postcopy { shared, receiver })
    }

    /// Tells the source the VM runs here.
    pub fn confirm_running(&self, running: &Running) -> Result<(), String> {
        match lock(&self.shared.writer).as_mut() {
            Some(w) => protocol::write_json(w, Kind::Running, running).map_err(|e| chain(&e)),
            None => Err("the link to the source is down".into()),
        }
    }

    /// Pages still missing.
    pub fn missing(&self) -> u64 {
        self.shared.need.count()
    }

    /// Waits until every page arrived (or post-copy failed for good).
    pub fn wait(self) -> Result<Done, String> {
        self.receiver.recv().map_err(|_| "the post-copy receiver panicked".to_string())?
    }
}

/// Drops the pages of `ranges` (checked against RAM) from this process: their next access
/// faults (into userfaultfd once RAM is registered).
pub fn drop_pages(map: &PageMap, ranges: &[(u64, u64)]) -> Result<(), String> {
    for &(gpa, pages) in ranges {
        let first = map.index_of_gpa(gpa).filter(|&i| gpa % PAGE == 0 && pages <= map.run_limit(i));
        let Some(first) = first else {
            return Err(format!("page range {gpa:#x}+{pages} lies outside guest RAM"));
        };
        // SAFETY: the range lies in one RAM region of this process (checked above);
        // MADV_DONTNEED only drops pages, which then read as missing.
        let rc = unsafe {
            libc::madvise(map.host(first) as *mut libc::c_void, (pages * PAGE) as usize, libc::MADV_DONTNEED)
        };
        if rc != 0 {
            return Err(format!("cannot discard re-dirtied pages: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Reads fault events until post-copy is finished, then unregisters RAM (which wakes any
/// thread still waiting: those pages are zero, and now fault in as zero pages).
fn fault_loop(shared: &Shared) {
    let mut events = userfaultfd::EventBuffer::new(64);
    let fd = shared.uffd.as_raw_fd();
    while !shared.finished.load(Relaxed) {
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut poll, 1, 50) } <= 0 {
            continue;
        }
        let Ok(batch) = shared.uffd.read_events(&mut events) else {
            continue;
        };
        for event in batch.flatten() {
            if let Event::Pagefault { addr, .. } = event {
                on_fault(shared, addr as usize);
            }
        }
    }
    let _ = shared.unregister_all();
}

fn on_fault(shared: &Shared, addr: usize) {
    shared.faults.fetch_add(1, Relaxed);
    let Some(index) = shared.map.index_of_host(addr) else {
        log::warn!("post-copy: fault at {addr:#x} outside guest RAM");
        return;
    };
    let host = shared.map.host(index);
    if !shared.need.contains(index) {
        // Already installed (the fault raced the install), or a page pre-copy delivered
        // (prepared RAM: its contents are there, map it) or left zero (zero-fill it);
        // EEXIST means it is there, and the install woke the thread.
        // SAFETY: one page of registered guest RAM.
        let filled = unsafe {
            match shared.prepared {
                Some(_) => shared.uffd.r#continue(host as *mut libc::c_void, PAGE as usize, true).map(|n| n as usize),
                None => shared.uffd.zeropage(host as *mut libc::c_void, PAGE as usize, true),
            }
        };
        match filled {
            Ok(_) => {
                shared.local_zero.fetch_add(1, Relaxed);
            }
            Err(_) => {
                let _ = shared.uffd.wake(host as *mut libc::c_void, PAGE as usize);
            }
        }
        return;
    }
    let mut pending = lock(&shared.pending);
    if pending.contains_key(&index) {
        return;
    }
    pending.insert(index, Instant::now());
    drop(pending);
    log::trace!("post-copy: requesting page {:#x}", shared.map.gpa(index));
    shared.requested.fetch_add(1, Relaxed);
    shared.request(&[index]);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Installs the answers that come over the urgent channel; a broken urgent channel only
/// sends later requests over the main connection.
fn receive_urgent(shared: &Shared, ram: &GuestRam, mut stream: Box<dyn Stream>) {
    let mut buffer = Vec::new();
    loop {
        // Read as the push is, straight into prepared RAM: a guest walking its memory
        // pulls up to a fifth of it through this channel (see the source's `Prefetch`).
        let applied = match protocol::read_header(&mut stream) {
            Ok((Kind::PostcopyPages, len)) => shared.receive_pages(ram, &mut stream, len, &mut buffer),
            Ok((other, _)) => Err(format!("unexpected {other:?} on the urgent channel")),
            Err(e) => Err(chain(&e)),
        };
        if let Err(e) = applied {
            if !shared.finished.load(Relaxed) {
                log::info!("post-copy: urgent channel closed ({e}); requests go over the main connection");
            }
            *lock(&shared.urgent) = None;
            return;
        }
    }
}

impl Shared {
    /// Asks the source for pages, over the urgent channel when there is one; while the
    /// link is down a request stays pending and is sent again after the reconnection.
    fn request(&self, indices: &[u64]) {
        let mut payload = Vec::with_capacity(indices.len() * 8);
        for &i in indices {
            payload.extend_from_slice(&self.map.gpa(i).to_le_bytes());
        }
        for channel in [&self.urgent, &self.writer] {
            let mut writer = lock(channel);
            if let Some(w) = writer.as_mut() {
                if protocol::write_frame(w, Kind::PageRequest, &payload).and_then(|()| Ok(w.flush()?)).is_ok() {
                    return;
                }
                // The receiver notices a broken main link too and starts the recovery.
                *writer = None;
            }
        }
    }

    /// Asks for every page still missing over the main connection (in frames of at most
    /// 4096 requests): after the source's Complete, pages that were in flight on a
    /// broken urgent channel.
    fn request_all_missing(&self) {
        let mut missing = Vec::new();
        let mut at = 0;
        while let Some(i) = self.need.next_from(at) {
            missing.push(i);
            at = i + 1;
        }
        for chunk in missing.chunks(protocol::MAX_REQUEST_PAGES) {
            let mut writer = lock(&self.writer);
            if let Some(w) = writer.as_mut() {
                let payload: Vec<u8> = chunk.iter().flat_map(|&i| self.map.gpa(i).to_le_bytes()).collect();
                if protocol::write_frame(w, Kind::PageRequest, &payload).and_then(|()| Ok(w.flush()?)).is_err() {
                    *writer = None;
                }
            }
        }
    }

    fn unregister_all(&self) -> Result<(), userfaultfd::Error> {
        // Region by region as the page map knows them.
        let mut index = 0;
        while index < self.map.total() {
            let run = self.map.run_limit(index);
            self.uffd.unregister(self.map.host(index) as *mut libc::c_void, (run * PAGE) as usize)?;
            index += run;
        }
        Ok(())
    }

    /// Installs `pages` pages at page `first` from `data` (or zeros when `data` is None),
    /// skipping the ones already here, and records the latency of requested ones.
    fn install(&self, first: u64, pages: u64, data: Data) -> Result<(), String> {
        let ours = self.claim(first, pages);
        let result = self.install_claimed(first, &ours, data);
        if result.is_err() {
            self.release(first, &ours);
        }
        result
    }

    /// Claims the pages of a record that are still needed: the urgent and the main
    /// receiver may both hold a page, and with prepared RAM a write through the second
    /// mapping is not atomic with mapping it, so only one of them may write it, once (a
    /// second write could land after the guest already changed the page). A page is
    /// claimed once for good (the claim stays after the install).
    fn claim(&self, first: u64, pages: u64) -> Vec<bool> {
        (first..first + pages).map(|p| self.need.contains(p) && self.claimed.insert(p)).collect()
    }

    /// Gives back the claims on pages that were not installed (a failed install or frame).
    fn release(&self, first: u64, ours: &[bool]) {
        for (k, _) in ours.iter().enumerate().filter(|(_, o)| **o) {
            if self.need.contains(first + k as u64) {
                self.claimed.remove(first + k as u64);
            }
        }
    }

    /// Installs the pages of a record this receiver claimed (`ours`).
    fn install_claimed(&self, first: u64, ours: &[bool], data: Data) -> Result<(), String> {
        use userfaultfd::Error::{CopyFailed, PartiallyCopied, SystemError, ZeropageFailed};
        let pages = ours.len() as u64;
        let (mut i, mut single, mut retries) = (0, false, 0);
        while i < pages {
            if !ours[i as usize] || !self.need.contains(first + i) {
                i += 1;
                continue;
            }
            let mut run = 1;
            while !single && i + run < pages && ours[(i + run) as usize] {
                run += 1;
            }
            let dst = self.map.host(first + i) as *mut libc::c_void;
            let len = (run * PAGE) as usize;
            let src = match data {
                Data::Bytes(d) => Data::Bytes(&d[(i * PAGE) as usize..][..len]),
                other => other,
            };
            let result = match (&self.prepared, src) {
                (Some(prepared), src) => self.fill_prepared(prepared, first + i, run, src),
                // SAFETY: `dst..dst+len` is registered guest RAM within one region (the
                // record was checked against RAM), `d` holds `len` bytes of the frame.
                (None, Data::Bytes(d)) => unsafe { self.uffd.copy(d.as_ptr().cast(), dst, len, true) },
                // SAFETY: as above.
                (None, Data::Zero) => unsafe { self.uffd.zeropage(dst, len, true) },
                (None, Data::Staged) => return Err("pages staged without prepared RAM".into()),
            };
            // The kernel stops a range at a page it cannot fill: one that exists already
            // (EEXIST when it is the first) or a transient EAGAIN. Go on page by page from
            // there, so a page is only ever counted as here when it is.
            let (done, skipped) = match result {
                Ok(n) => ((n as u64 / PAGE).min(run), 0),
                Err(PartiallyCopied(n)) => {
                    single = true;
                    ((n as u64 / PAGE).min(run), 0)
                }
                Err(CopyFailed(e) | ZeropageFailed(e) | SystemError(e)) if e as i32 == libc::EEXIST => (0, 1),
                Err(CopyFailed(e) | ZeropageFailed(e) | SystemError(e))
                    if e as i32 == libc::EAGAIN && retries < 1000 =>
                {
                    single = true;
                    retries += 1;
                    std::thread::yield_now();
                    (0, 0)
                }
                Err(e) => return Err(format!("installing page {:#x} failed: {e}", self.map.gpa(first + i))),
            };
            for p in first + i..first + i + done + skipped {
                self.installed(p);
            }
            i += done + skipped;
        }
        Ok(())
    }

    /// Prepared RAM: writes `run` pages from page `first` (zeros where nothing but zeros
    /// was written here, nothing where the memory is still fresh) through the second
    /// mapping, then maps them for the guest (UFFDIO_CONTINUE), which wakes the faulting
    /// threads. Returns the bytes mapped, like UFFDIO_COPY.
    fn fill_prepared(
        &self,
        prepared: &Prepared,
        first: u64,
        run: u64,
        data: Data,
    ) -> Result<usize, userfaultfd::Error> {
        let offset = (first * PAGE) as usize;
        match data {
            Data::Bytes(d) => {
                prepared.write(offset, d);
            }
            Data::Zero => {
                for p in first..first + run {
                    if self.touched.contains(p) {
                        prepared.zero((p * PAGE) as usize, PAGE as usize);
                    }
                }
            }
            Data::Staged => {}
        }
        let dst = self.map.host(first) as *mut libc::c_void;
        // `run` pages of registered guest RAM within one region.
        self.uffd.r#continue(dst, (run * PAGE) as usize, true).map(|n| n as usize)
    }

    fn installed(&self, index: u64) {
        if !self.need.remove(index) {
            return;
        }
        self.received.fetch_add(1, Relaxed);
        let asked = lock(&self.pending).remove(&index);
        if let Some(asked) = asked {
            lock(&self.latencies_us).push(asked.elapsed().as_micros() as u64);
        }
    }

    /// Checks one PostcopyPages payload (CRC32 first, then every record) and installs it.
    fn apply(&self, ram: &GuestRam, payload: &[u8]) -> Result<(), String> {
        for record in postcopy_records(ram, payload)? {
            let first = self.map.index_of_gpa(record.gpa).ok_or("record outside RAM")?;
            self.install(first, record.pages, if record.is_zero() { Data::Zero } else { Data::Bytes(record.data) })?;
        }
        Ok(())
    }

    /// Receives one PostcopyPages payload of `len` bytes from `stream` and installs it.
    fn receive_pages<R: std::io::Read + ?Sized>(
        &self,
        ram: &GuestRam,
        stream: &mut R,
        len: u64,
        buffer: &mut Vec<u8>,
    ) -> Result<(), String> {
        let Some(prepared) = &self.prepared else {
            buffer.resize(len as usize, 0);
            stream.read_exact(buffer).map_err(|e| e.to_string())?;
            return self.apply(ram, buffer);
        };
        let mut staged = Vec::new();
        let result = self.read_direct(ram, prepared, stream, len, buffer, &mut staged);
        if let Err(e) = result {
            self.release_staged(&staged);
            return Err(e);
        }
        let mut records = staged.iter();
        let installed = records.try_for_each(|record| match record {
            Staged::Zero { first, pages } => self.install(*first, *pages, Data::Zero),
            Staged::Claimed { first, ours, at } => {
                let data = match at {
                    Some(at) => Data::Bytes(&buffer[*at..*at + ours.len() * PAGE as usize]),
                    None => Data::Staged,
                };
                self.install_claimed(*first, ours, data)
            }
        });
        if installed.is_err() {
            // The record that failed and every one after it: their pages must stay
            // claimable, or nothing could install them after the recovery.
            let failed = staged.len() - records.len() - 1;
            self.release_staged(&staged[failed..]);
        }
        installed
    }

    /// Gives back the claims `read_direct` took for `staged` records.
    fn release_staged(&self, staged: &[Staged]) {
        for record in staged {
            if let Staged::Claimed { first, ours, .. } = record {
                self.release(*first, ours);
            }
        }
    }

    /// Reads a PostcopyPages payload record by record (prepared RAM): the data of pages
    /// this receiver can claim goes from the socket straight into RAM's second mapping, one
    /// copy less per page than through a buffer (that copy was 8% of both processes'
    /// samples while an all-written 1 GiB guest moved); a record with a page it cannot
    /// claim goes into `buffer`. Nothing is mapped for the guest here: the caller installs
    /// `staged` once the whole frame checked out (CRC32 and every record).
    fn read_direct<R: std::io::Read + ?Sized>(
        &self,
        ram: &GuestRam,
        prepared: &Prepared,
        stream: &mut R,
        len: u64,
        buffer: &mut Vec<u8>,
        staged: &mut Vec<Staged>,
    ) -> Result<(), String> {
        let io = |e: std::io::Error| e.to_string();
        let mut crc = [0u8; 4];
        let mut rest = len.checked_sub(4).ok_or("post-copy frame without a checksum")?;
        stream.read_exact(&mut crc).map_err(io)?;
        let mut hasher = crc32fast::Hasher::new();
        let mut header = [0u8; memory::RECORD_HEADER];
        buffer.clear();
        while rest > 0 {
            rest = rest.checked_sub(header.len() as u64).ok_or("truncated record header")?;
            stream.read_exact(&mut header).map_err(io)?;
            hasher.update(&header);
            let record = memory::record_header_checked(ram, &header).map_err(|e| chain(&e))?;
            let first = self.map.index_of_gpa(record.gpa).ok_or("record outside RAM")?;
            whole_pages(&record)?;
            if record.is_zero() {
                staged.push(Staged::Zero { first, pages: record.pages });
                continue;
            }
            let bytes = record.pages * PAGE;
            rest = rest.checked_sub(bytes).ok_or("record data past the frame")?;
            let ours = self.claim(first, record.pages);
            if ours.iter().all(|&o| o) {
                staged.push(Staged::Claimed { first, ours, at: None });
                // SAFETY: this receiver claimed every page of the record: no other thread
                // writes them, and none is mapped for the guest (they are still needed;
                // only `install_claimed` maps them, after the checksum), so nothing reads them.
                let data = unsafe { prepared.read_into((first * PAGE) as usize, bytes as usize, stream) };
                hasher.update(data.map_err(io)?);
            } else {
                let at = buffer.len();
                buffer.resize(at + bytes as usize, 0);
                stream.read_exact(&mut buffer[at..]).map_err(io)?;
                hasher.update(&buffer[at..]);
                staged.push(Staged::Claimed { first, ours, at: Some(at) });
            }
        }
        if hasher.finalize() != u32::from_le_bytes(crc) {
            return Err("post-copy frame checksum mismatch".into());
        }
        Ok(())
    }

    fn done(&self, started: Instant, recoveries: u32) -> Done {
        let mut latencies = lock(&self.latencies_us).clone();
        latencies.sort_unstable();
        let pick = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
        Done {
            demand_faults: self.faults.load(Relaxed),
            requested_pages: self.requested.load(Relaxed),
            received_pages: self.received.load(Relaxed),
            local_zero_pages: self.local_zero.load(Relaxed),
            fault_latency_p50_us: pick(0.5),
            fault_latency_p99_us: pick(0.99),
            fault_latency_max_us: latencies.last().copied().unwrap_or(0),
            recoveries,
            postcopy_ms: started.elapsed().as_secs_f64() * 1e3,
        }
    }
}

/// The records of one PostcopyPages payload, all checked (CRC32 first, then every record
/// against RAM) before the caller installs a single page.
pub(crate) fn postcopy_records<'a>(ram: &'a GuestRam, payload: &'a [u8]) -> Result<Vec<memory::Record<'a>>, String> {
    let (crc, records) = payload.split_at_checked(4).ok_or("post-copy frame without a checksum")?;
    let crc = u32::from_le_bytes(crc.try_into().unwrap_or([0; 4]));
    if crc32fast::hash(records) != crc {
        return Err("post-copy frame checksum mismatch".into());
    }
    let records = memory::records(ram, records).collect::<Result<Vec<_>, _>>().map_err(|e| chain(&e))?;
    records.iter().try_for_each(whole_pages)?;
    Ok(records)
}

/// Post-copy installs whole pages: a delta record has nothing to go over.
fn whole_pages(record: &memory::Record) -> Result<(), String> {
    match record.is_delta() {
        true => Err(format!("a delta record (page {:#x}) in a post-copy frame", record.gpa)),
        false => Ok(()),
    }
}

/// Where the pages of a record come from when they are installed.
#[derive(Clone, Copy)]
enum Data<'a> {
    /// A zero record.
    Zero,
    /// The record's bytes.
    Bytes(&'a [u8]),
    /// Read into prepared RAM already (`Shared::read_direct`): only to be mapped.
    Staged,
}

/// A record read by `Shared::read_direct`, to be installed once its frame checked out.
enum Staged {
    Zero {
        first: u64,
        pages: u64,
    },
    /// Data pages, `ours` the ones this receiver claimed; `at`: where in the buffer the
    /// data is, or `None` when it went straight into RAM.
    Claimed {
        first: u64,
        ours: Vec<bool>,
        at: Option<usize>,
    },
}

/// Installs what the source sends until it says it sent everything, recovering from
/// broken links; then reports Done. A failure for good ends the process: the VM cannot
/// go on without its memory, and the user must hear why.
fn receive_loop(
    shared: &Shared,
    ram: &GuestRam,
    mut stream: Box<dyn Stream>,
    recovery: &Recovery,
) -> Result<Done, String> {
    let started = Instant::now();
    let mut recoveries = 0;
    let mut receiving = Receiving::default();
    loop {
        // Read in bulk (see `LowWater`), one per connection: the mark is set per read and
        // put back when the connection ends.
        let failure = match receiving.frames(shared, ram, &mut LowWater::new(stream.as_mut())) {
            Ok(()) => {
                let done = shared.done(started, recoveries);
                shared.finished.store(true, Relaxed);
                if let Some(w) = lock(&shared.writer).as_mut() {
                    let _ = protocol::write_json(w, Kind::Done, &done);
                }
                return Ok(done);
            }
            Err(failure) => failure,
        };
        stream.shutdown_both();
        stream = match reconnect(shared, recovery, &failure) {
            Ok(s) => s,
            // The link broke after the last page arrived (before or instead of Complete):
            // nothing of the VM is only on the source any more. Giving up here would end
            // a VM that has all of its memory (the fault matrix's kill-src at Complete).
            Err(e) if shared.need.count() == 0 => {
                eprintln!("popek: the source did not come back ({e}), but every page is here: the VM runs on");
                shared.finished.store(true, Relaxed);
                return Ok(shared.done(started, recoveries));
            }
            Err(e) => unrecoverable(&e),
        };
        recoveries += 1;
    }
}

/// Where the main receiver is, across reconnections.
#[derive(Default)]
struct Receiving {
    /// The source said it sent everything.
    complete: bool,
    /// Pages still missing after Complete were asked for again.
    asked_again: bool,
    payload: Vec<u8>,
    /// Where PostcopyPagesLz4 payloads are decompressed.
    unpacked: Vec<u8>,
}

impl Receiving {
    /// Reads and installs frames from one connection until every page is here (Ok) or the
    /// connection fails (Err: why).
    fn frames(&mut self, shared: &Shared, ram: &GuestRam, stream: &mut LowWater) -> Result<(), String> {
        loop {
            if self.complete && !self.asked_again && shared.need.count() > 0 {
                self.asked_again = true;
                // Answers still in flight on the urgent channel get a moment; then whatever
                // is missing is asked for again over this connection.
                let deadline = Instant::now() + Duration::from_millis(500);
                while shared.need.count() > 0 && Instant::now() < deadline && lock(&shared.urgent).is_some() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if shared.need.count() > 0 {
                    shared.request_all_missing();
                }
            }
            if self.complete && shared.need.count() == 0 {
                return Ok(());
            }
            let payload = &mut self.payload;
            let frame = protocol::read_header(stream).and_then(|(kind, len)| match kind {
                Kind::PostcopyPages => Ok((kind, Some(len))),
                _ => {
                    payload.resize(len as usize, 0);
                    stream.read_exact(payload)?;
                    Ok((kind, None))
                }
            });
            match frame {
                Ok((Kind::PostcopyPages, Some(len))) => shared.receive_pages(ram, stream, len, payload)?,
                Ok((Kind::PostcopyPagesLz4, _)) => {
                    let raw = compress::unpack(payload, &mut self.unpacked).map_err(|e| chain(&e))?;
                    shared.apply(ram, raw)?;
                }
                Ok((Kind::Complete, _)) => (self.complete, self.asked_again) = (true, false),
                Ok((Kind::Refuse, _)) => unrecoverable("the source aborted during post-copy"),
                Ok((other, _)) => return Err(format!("unexpected {other:?} message during post-copy")),
                Err(e) => return Err(chain(&e)),
            }
        }
    }
}

/// Waits for the source to come back, bounded by the recovery timeout.
fn reconnect(shared: &Shared, recovery: &Recovery, why: &str) -> Result<Box<dyn Stream>, String> {
    *lock(&shared.writer) = None;
    eprintln!(
        "popek: post-copy link lost ({why}); the guest waits on {} missing pages; waiting up to {} s for the source on {}",
        shared.need.count(),
        recovery.timeout.as_secs(),
        recovery.address
    );
    let deadline = Instant::now() + recovery.timeout;
    loop {
        let mut stream = recovery.listener.accept(Some(deadline)).map_err(|e| chain(&e))?;
        match resume_handshake(shared, recovery, &mut stream) {
            Ok(()) => {
                eprintln!("popek: post-copy link re-established; {} pages to go", shared.need.count());
                return Ok(stream);
            }
            Err(e) => eprintln!("popek: refused a post-copy reconnection: {e}"),
        }
    }
}

fn resume_handshake(shared: &Shared, recovery: &Recovery, stream: &mut Box<dyn Stream>) -> Result<(), String> {
    stream.set_timeout(Duration::from_secs(30)).map_err(|e| e.to_string())?;
    let mut first = protocol::read_frame(stream).map_err(|e| chain(&e))?;
    if let Some(key) = &recovery.auth_key {
        super::auth::verify_source(stream, key, first)?;
        first = protocol::read_frame(stream).map_err(|e| chain(&e))?;
    }
    if first.0 != Kind::Resume {
        return Err(format!("expected Resume, got {:?}", first.0));
    }
    let resume: Resume = serde_json::from_slice(&first.1).map_err(|e| format!("malformed Resume: {e}"))?;
    if resume.migration_id != recovery.migration_id {
        let reason = "this destination is finishing another migration".to_string();
        let _ = protocol::write_json(stream, Kind::Refuse, &protocol::Answer { reason: reason.clone() });
        return Err(reason);
    }
    let missing = Missing { ranges: shared.need.ranges(&shared.map) };
    protocol::write_json(stream, Kind::Missing, &missing).map_err(|e| chain(&e))?;
    let writer = stream.try_clone_stream().map_err(|e| e.to_string())?;
    *lock(&shared.writer) = Some(writer);
    // The requests sent on the broken link may be lost: ask again.
    let pending: Vec<u64> = lock(&shared.pending).keys().copied().collect();
    for chunk in pending.chunks(protocol::MAX_REQUEST_PAGES) {
        shared.request(chunk);
    }
    Ok(())
}

/// The one case post-copy cannot survive: one side has part of the memory, the other
/// side the rest and the vCPUs, and one of them is gone.
fn unrecoverable(why: &str) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    eprintln!(
        "popek: post-copy failed for good: {why}. The VM cannot continue: its vCPUs are here and part of its memory was only on the source (unrecoverable)."
    );
    std::process::exit(18)
}
