//! The paravirtual hypercall device (ABI in docs/hypercall.md and `popek_abi::hypercall`).
//!
//! One call is one exit: the guest writes the guest-physical address of a 48-byte request
//! block to the hypercall port; this device reads the block from guest memory, runs the
//! call and writes the result into the block's `ret` before the vCPU resumes. No register
//! ioctls, the same on every host kind. Every guest-supplied address and length is checked
//! against guest RAM; bad ones get -EFAULT/-EINVAL, unknown numbers -ENOSYS.

use super::console::Console;
use super::{BusDevice, VmRequest};
use crate::memory::{self, GuestRam};
use popek_abi::hypercall::{self as hc, Request};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vm_memory::{Bytes, GuestAddress};

/// The feature bits this device offers (CPUID 0x40000001 EAX and the FEATURES call).
pub const FEATURES: u64 = hc::FEATURE_CONSOLE
    | hc::FEATURE_CLOCK
    | hc::FEATURE_SLEEP
    | hc::FEATURE_RANDOM
    | hc::FEATURE_FREE_PAGE_HINTS
    | hc::FEATURE_GENERATION
    | hc::FEATURE_DOORBELL;

/// A call's outcome: a result for `ret`, and possibly something the VM must do.
type Outcome = (i64, Option<VmRequest>);

fn errno(e: i64) -> Outcome {
    (-e, None)
}

/// State the hypercall device shares with the rest of the VMM (migration reads the free
/// page hints and bumps the generation; the event loop counts doorbell rings).
pub struct HypercallState {
    generation: AtomicU64,
    generation_gpa: Mutex<Option<u64>>,
    doorbell_rings: Arc<AtomicU64>,
    exits: Arc<crate::trap::exits::Recorder>,
    free_pages: Mutex<FreePages>,
    calls: [AtomicU64; hc::LAST as usize + 1],
    bad_calls: AtomicU64,
}

impl HypercallState {
    /// Fresh state for a VM with `ram`; `doorbell_rings` is counted by the doorbell.
    pub fn new(ram: &GuestRam, doorbell_rings: Arc<AtomicU64>, exits: Arc<crate::trap::exits::Recorder>) -> Self {
        HypercallState {
            generation: AtomicU64::new(0),
            generation_gpa: Mutex::new(None),
            doorbell_rings,
            exits,
            free_pages: Mutex::new(FreePages::new(ram)),
            calls: std::array::from_fn(|_| AtomicU64::new(0)),
            bad_calls: AtomicU64::new(0),
        }
    }

    /// Calls made so far, by number.
    pub fn call_counts(&self) -> Vec<(u64, u64)> {
        let counts = self.calls.iter().map(|c| c.load(Ordering::Relaxed));
        (0..).zip(counts).filter(|(_, n)| *n > 0).collect()
    }

    /// Requests that were refused before a call could run (bad block address).
    pub fn bad_calls(&self) -> u64 {
        self.bad_calls.load(Ordering::Relaxed)
    }

    /// Pages the guest currently hints as free.
    pub fn free_page_count(&self) -> u64 {
        lock(&self.free_pages).count
    }

    /// Whether the page at `gpa` is hinted free.
    pub fn is_free(&self, gpa: u64) -> bool {
        lock(&self.free_pages).get(gpa / hc::PAGE_SIZE)
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The state that travels with a migration.
    pub fn export(&self) -> crate::migration::state::DeviceState {
        crate::migration::state::DeviceState {
            generation: self.generation(),
            generation_gpa: *lock(&self.generation_gpa),
            doorbell_rings: self.doorbell_rings.load(Ordering::SeqCst),
            free_pages: lock(&self.free_pages).runs(),
            ..Default::default()
        }
    }

    /// Takes over a migrated state: the generation goes up by one (the guest sees it in
    /// its word once `publish_generation` writes it there).
    pub fn import(&self, devices: &crate::migration::state::DeviceState) {
        // Wraps instead of overflowing: only a forged state holds u64::MAX, and a guest
        // learns of a migration from the generation changing, which 0 still is.
        let generation = devices.generation.wrapping_add(1);
        self.generation.store(generation, Ordering::SeqCst);
        *lock(&self.generation_gpa) = devices.generation_gpa;
        self.doorbell_rings.store(devices.doorbell_rings, Ordering::SeqCst);
        lock(&self.free_pages).set_runs(&devices.free_pages);
    }

    /// Writes the generation into the guest's word (if it registered one). Separate from
    /// `import`, which may run while RAM is still arriving: the word must be written after
    /// the last page, or that page would overwrite it with the source's old value.
    pub fn publish_generation(&self, ram: &GuestRam) {
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some(gpa) = *lock(&self.generation_gpa) {
            if ram.write_obj(generation, GuestAddress(gpa)).is_err() {
                log::warn!("cannot update the guest's generation word at {gpa:#x}");
            }
        }
    }
}

/// Sleeps up to `duration`, but returns early when the vCPU thread is kicked (a pause for
/// migration must not wait out a 10 s sleep); returns the time left. std's sleep would
/// resume after the signal, so this is one nanosleep(2).
fn interruptible_sleep(duration: Duration) -> Duration {
    let request = libc::timespec {
        tv_sec: duration.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(duration.subsec_nanos() as i32),
    };
    let mut left = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: nanosleep reads `request` and writes `left`, both live locals.
    if unsafe { libc::nanosleep(&request, &mut left) } == 0 {
        return Duration::ZERO;
    }
    Duration::new(left.tv_sec.max(0) as u64, left.tv_nsec.clamp(0, 999_999_999) as u32)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One bit per guest page frame, up to the highest RAM address.
struct FreePages {
    bits: Vec<u64>,
    count: u64,
}

impl FreePages {
    fn new(ram: &GuestRam) -> Self {
        use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
        let end = ram.iter().map(|r| r.last_addr().raw_value() + 1).max().unwrap_or(0);
        let frames = end.div_ceil(hc::PAGE_SIZE);
        FreePages { bits: vec![0; frames.div_ceil(64) as usize], count: 0 }
    }

    fn get(&self, pfn: u64) -> bool {
        self.bits.get((pfn / 64) as usize).is_some_and(|w| w & (1 << (pfn % 64)) != 0)
    }

    /// The hinted frames as runs `(first frame, frames)`, in order: what a migration
    /// carries. A guest hints free memory in ranges, so this is a few runs where the bitmap
    /// of a 1 GiB guest is 4,096 words (32 KiB to copy, and 4,096 varints to encode and to
    /// decode, inside the downtime: tens of us on the test host).
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        if self.count == 0 {
            // No hints (most guests): no pass over a bitmap that is not in the cache.
            return runs;
        }
        // The first frame of the run being read, if one is open.
        let mut open: Option<u64> = None;
        for (first, &word) in (0u64..).step_by(64).zip(&self.bits) {
            // Whole words first: most are all clear, or all set inside a long run.
            match (word, open) {
                (0, None) | (u64::MAX, Some(_)) => continue,
                (0, Some(start)) => {
                    runs.push((start, first - start));
                    open = None;
                    continue;
                }
                (u64::MAX, None) => {
                    open = Some(first);
                    continue;
                }
                _ => {}
            }
            for bit in 0..64 {
                match (word >> bit & 1 == 1, open) {
                    (true, None) => open = Some(first + bit),
                    (false, Some(start)) => {
                        runs.push((start, first + bit - start));
                        open = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(start) = open {
            runs.push((start, self.bits.len() as u64 * 64 - start));
        }
        runs
    }

    /// Replaces the hints with `runs` (from a migration). Only a forged state has runs out
    /// of order, overlapping or past this VM's RAM: the hints stop at the first such run
    /// (hints are only hints), which also bounds the work to one pass over the bitmap.
    fn set_runs(&mut self, runs: &[(u64, u64)]) {
        if self.count > 0 {
            self.bits.fill(0);
            self.count = 0;
        }
        let frames = self.bits.len() as u64 * 64;
        let mut end = 0;
        for &(first, n) in runs {
            let Some(last) = first.checked_add(n).filter(|&last| first >= end && last <= frames && n > 0) else {
                log::warn!("migrated free-page hints stop at a bad run ({first}, {n})");
                return;
            };
            for frame in first..last {
                self.bits[(frame / 64) as usize] |= 1 << (frame % 64);
            }
            self.count += n;
            end = last;
        }
    }

    /// Sets or clears `npages` bits from `pfn`; returns how many changed.
    fn set_range(&mut self, pfn: u64, npages: u64, free: bool) -> u64 {
        let mut changed = 0;
        for frame in pfn..pfn + npages {
            let Some(word) = self.bits.get_mut((frame / 64) as usize) else {
                break;
            };
            let bit = 1u64 << (frame % 64);
            if (*word & bit != 0) != free {
                *word ^= bit;
                changed += 1;
            }
        }
        if free {
            self.count += changed;
        } else {
            self.count -= changed;
        }
        changed
    }
}

/// The hypercall device on the port bus.
pub struct HypercallDevice {
    ram: GuestRam,
    console: Console,
    state: Arc<HypercallState>,
}

impl HypercallDevice {
    pub fn new(ram: GuestRam, console: Console, state: Arc<HypercallState>) -> Self {
        HypercallDevice { ram, console, state }
    }

    /// Checks that `[gpa, gpa + len)` is guest RAM.
    fn check_range(&self, gpa: u64, len: u64) -> Result<(), i64> {
        if memory::is_ram(&self.ram, gpa, len) {
            Ok(())
        } else {
            Err(hc::EFAULT)
        }
    }

    fn call(&self, request: &Request) -> Outcome {
        let [a0, a1, _, _] = request.args;
        match request.nr {
            hc::VERSION => (hc::VERSION_1 as i64, None),
            hc::FEATURES => (FEATURES as i64, None),
            hc::PING => (0, None),
            hc::CONSOLE_WRITE => self.console_write(a0, a1),
            hc::EXIT => match u8::try_from(a0) {
                Ok(status) => (0, Some(VmRequest::Exit(status))),
                Err(_) => errno(hc::EINVAL),
            },
            hc::CLOCK => clock(a0),
            hc::SLEEP if a0 > hc::SLEEP_MAX_NS => errno(hc::EINVAL),
            hc::SLEEP => (interruptible_sleep(Duration::from_nanos(a0)).as_nanos() as i64, None),
            hc::YIELD => {
                std::thread::yield_now();
                (0, None)
            }
            hc::RANDOM => self.random(a0, a1),
            hc::FREE_PAGE_HINT => self.hint(a0, a1, true),
            hc::FREE_PAGE_UNHINT => self.hint(a0, a1, false),
            hc::GENERATION => (self.state.generation() as i64, None),
            hc::REGISTER_GENERATION => self.register_generation(a0),
            hc::DOORBELL_COUNT => (self.state.doorbell_rings.load(Ordering::SeqCst) as i64, None),
            hc::EXIT_COUNT => (self.state.exits.total() as i64, None),
            _ => errno(hc::ENOSYS),
        }
    }

    fn console_write(&self, gpa: u64, len: u64) -> Outcome {
        if len > hc::CONSOLE_WRITE_MAX {
            return errno(hc::EINVAL);
        }
        if let Err(e) = self.check_range(gpa, len) {
            return errno(e);
        }
        let mut bytes = vec![0u8; len as usize];
        if self.ram.read_slice(&mut bytes, GuestAddress(gpa)).is_err() {
            return errno(hc::EFAULT);
        }
        if let Err(e) = self.console.write_bytes(&bytes) {
            log::debug!("console output failed: {e}");
        }
        (len as i64, None)
    }

    fn random(&self, gpa: u64, len: u64) -> Outcome {
        if len > hc::RANDOM_MAX {
            return errno(hc::EINVAL);
        }
        if let Err(e) = self.check_range(gpa, len) {
            return errno(e);
        }
        let mut bytes = vec![0u8; len as usize];
        if host_random(&mut bytes).is_err() || self.ram.write_slice(&bytes, GuestAddress(gpa)).is_err() {
            return errno(hc::EFAULT);
        }
        (len as i64, None)
    }

    fn hint(&self, gpa: u64, npages: u64, free: bool) -> Outcome {
        if !gpa.is_multiple_of(hc::PAGE_SIZE) || npages == 0 {
            return errno(hc::EINVAL);
        }
        let Some(len) = npages.checked_mul(hc::PAGE_SIZE) else {
            return errno(hc::EINVAL);
        };
        if let Err(e) = self.check_range(gpa, len) {
            return errno(e);
        }
        let changed = lock(&self.state.free_pages).set_range(gpa / hc::PAGE_SIZE, npages, free);
        (changed as i64, None)
    }

    fn register_generation(&self, gpa: u64) -> Outcome {
        if !gpa.is_multiple_of(8) {
            return errno(hc::EINVAL);
        }
        if let Err(e) = self.check_range(gpa, 8) {
            return errno(e);
        }
        *lock(&self.state.generation_gpa) = Some(gpa);
        match self.ram.write_obj(self.state.generation(), GuestAddress(gpa)) {
            Ok(()) => (0, None),
            Err(_) => errno(hc::EFAULT),
        }
    }

    /// Reads the request block at `gpa`, or `None` if it is not a valid block address.
    fn read_request(&self, gpa: u64) -> Option<Request> {
        if !gpa.is_multiple_of(8) || !memory::is_ram(&self.ram, gpa, hc::REQUEST_SIZE as u64) {
            return None;
        }
        let mut raw = [0u8; hc::REQUEST_SIZE];
        self.ram.read_slice(&mut raw, GuestAddress(gpa)).ok()?;
        let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        Some(Request { nr: word(0), args: [word(1), word(2), word(3), word(4)], ret: word(5) as i64 })
    }
}

impl BusDevice for HypercallDevice {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // Reading the port tells a probing guest the ABI version.
        let version = (hc::VERSION_1 as u32).to_le_bytes();
        for (d, v) in data.iter_mut().zip(version.iter().chain(std::iter::repeat(&0))) {
            *d = *v;
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if offset != 0 || data.len() != 4 {
            self.state.bad_calls.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let gpa = u64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
        let Some(request) = self.read_request(gpa) else {
            // No block to answer in: counted, and the guest sees its own `ret` unchanged.
            if self.state.bad_calls.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!("hypercall with an invalid request block address {gpa:#x} (logged once)");
            }
            return None;
        };
        if let Some(counter) = self.state.calls.get(request.nr as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let (ret, vm_request) = self.call(&request);
        let ret_gpa = GuestAddress(gpa + hc::RET_OFFSET as u64);
        if self.ram.write_obj(ret, ret_gpa).is_err() {
            self.state.bad_calls.fetch_add(1, Ordering::Relaxed);
        }
        vm_request
    }
}

fn clock(which: u64) -> Outcome {
    match which {
        hc::CLOCK_MONOTONIC => {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: clock_gettime writes one timespec to a valid, owned location.
            let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            if rc != 0 {
                return errno(hc::EINVAL);
            }
            (ts.tv_sec * 1_000_000_000 + ts.tv_nsec, None)
        }
        hc::CLOCK_REALTIME => match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => (i64::try_from(d.as_nanos()).unwrap_or(i64::MAX), None),
            Err(_) => errno(hc::EINVAL),
        },
        _ => errno(hc::EINVAL),
    }
}

/// Fills `bytes` from the host's random source.
fn host_random(bytes: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn ignore(_: libc::c_int) {}

    #[test]
    fn a_kicked_sleep_returns_early_with_the_time_left() {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: a no-op handler for a signal only this test sends.
        unsafe { libc::signal(libc::SIGUSR2, ignore as *const () as libc::sighandler_t) };
        let sleeper = std::thread::spawn(|| interruptible_sleep(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: the thread is alive (it sleeps for 10 s) and handles SIGUSR2.
        unsafe { libc::pthread_kill(sleeper.as_pthread_t(), libc::SIGUSR2) };
        let left = sleeper.join().unwrap();
        assert!(left > Duration::from_secs(5), "returned with {left:?} left");
        assert_eq!(interruptible_sleep(Duration::from_millis(1)), Duration::ZERO);
    }

    fn device() -> (HypercallDevice, GuestRam) {
        let ram = memory::create_ram(16 << 20).unwrap();
        let recorder = crate::trap::exits::Recorder::new(1, None).unwrap();
        let state = Arc::new(HypercallState::new(&ram, Arc::new(AtomicU64::new(0)), recorder));
        (HypercallDevice::new(ram.clone(), Console::new(Box::new(std::io::sink())), state), ram)
    }

    fn call(dev: &HypercallDevice, ram: &GuestRam, nr: u64, args: [u64; 4]) -> (i64, Option<VmRequest>) {
        let gpa = 0x1000u64;
        let words = [nr, args[0], args[1], args[2], args[3], 0x7777];
        for (i, w) in words.iter().enumerate() {
            ram.write_obj(*w, GuestAddress(gpa + 8 * i as u64)).unwrap();
        }
        let request = dev.write(0, &(gpa as u32).to_le_bytes());
        (ram.read_obj::<i64>(GuestAddress(gpa + 40)).unwrap(), request)
    }

    #[test]
    fn calls_and_errors() {
        let (dev, ram) = device();
        assert_eq!(call(&dev, &ram, hc::VERSION, [0; 4]).0, 1);
        assert_eq!(call(&dev, &ram, hc::PING, [0; 4]).0, 0);
        assert_eq!(call(&dev, &ram, 999, [0; 4]).0, -hc::ENOSYS);
        assert_eq!(call(&dev, &ram, hc::CONSOLE_WRITE, [0x2000, 5, 0, 0]).0, 5);
        assert_eq!(call(&dev, &ram, hc::CONSOLE_WRITE, [u64::MAX - 2, 5, 0, 0]).0, -hc::EFAULT);
        assert_eq!(call(&dev, &ram, hc::CONSOLE_WRITE, [0, hc::CONSOLE_WRITE_MAX + 1, 0, 0]).0, -hc::EINVAL);
        assert_eq!(call(&dev, &ram, hc::EXIT, [3, 0, 0, 0]), (0, Some(VmRequest::Exit(3))));
        assert_eq!(call(&dev, &ram, hc::EXIT, [256, 0, 0, 0]).0, -hc::EINVAL);
        assert_eq!(call(&dev, &ram, hc::FREE_PAGE_HINT, [0x10000, 4, 0, 0]).0, 4);
        assert_eq!(call(&dev, &ram, hc::FREE_PAGE_HINT, [0x11000, 4, 0, 0]).0, 1);
        assert!(dev.state.is_free(0x13000) && dev.state.is_free(0x14000));
        assert_eq!(dev.state.free_page_count(), 5);
        assert_eq!(call(&dev, &ram, hc::FREE_PAGE_UNHINT, [0x10000, 5, 0, 0]).0, 5);
        assert_eq!(call(&dev, &ram, hc::FREE_PAGE_HINT, [0x10001, 1, 0, 0]).0, -hc::EINVAL);
        assert_eq!(call(&dev, &ram, hc::FREE_PAGE_HINT, [0, u64::MAX, 0, 0]).0, -hc::EINVAL);
        assert_eq!(call(&dev, &ram, hc::FREE_PAGE_HINT, [0xff_f000, 2, 0, 0]).0, -hc::EFAULT);
        assert_eq!(call(&dev, &ram, hc::RANDOM, [0x3000, 64, 0, 0]).0, 64);
        assert_eq!(call(&dev, &ram, hc::SLEEP, [hc::SLEEP_MAX_NS + 1, 0, 0, 0]).0, -hc::EINVAL);
        assert!(call(&dev, &ram, hc::CLOCK, [hc::CLOCK_MONOTONIC, 0, 0, 0]).0 > 0);
        assert_eq!(call(&dev, &ram, hc::CLOCK, [7, 0, 0, 0]).0, -hc::EINVAL);
        assert_eq!(call(&dev, &ram, hc::REGISTER_GENERATION, [0x4004, 0, 0, 0]).0, -hc::EINVAL);
        assert_eq!(call(&dev, &ram, hc::REGISTER_GENERATION, [0x4000, 0, 0, 0]).0, 0);
    }

    #[test]
    fn free_page_hints_migrate_as_runs() {
        let (dev, ram) = device();
        // Runs inside a word, across words, whole words, and up to the last frame.
        for (gpa, npages) in [(0x3000, 2), (0x3e000, 3), (0x80000, 200), (0xff_f000, 1)] {
            assert_eq!(call(&dev, &ram, hc::FREE_PAGE_HINT, [gpa, npages, 0, 0]).0, npages as i64);
        }
        let exported = dev.state.export();
        assert_eq!(exported.free_pages, vec![(3, 2), (0x3e, 3), (0x80, 200), (0xfff, 1)]);
        let (other, _) = device();
        other.state.import(&exported);
        assert_eq!(other.state.free_page_count(), 206);
        assert!(other.state.is_free(0x40000) && !other.state.is_free(0x41000) && other.state.is_free(0xff_f000));
        assert_eq!(other.state.export().free_pages, exported.free_pages);
        // A forged state's hints stop at the first run out of order, overlapping or past
        // RAM, and a huge one costs no more than the bitmap.
        for forged in
            [vec![(8, 2), (4, 1)], vec![(8, 2), (9, 1)], vec![(8, 2), (0xfff, 2)], vec![(8, 2), (9, u64::MAX)]]
        {
            let mut devices = exported.clone();
            devices.free_pages = forged;
            other.state.import(&devices);
            assert_eq!(other.state.export().free_pages, vec![(8, 2)]);
            assert_eq!(other.state.free_page_count(), 2);
        }
    }

    #[test]
    fn bad_block_addresses_are_counted_not_fatal() {
        let (dev, _ram) = device();
        assert_eq!(dev.write(0, &0xffff_fff8u32.to_le_bytes()), None);
        assert_eq!(dev.write(0, &0x1001u32.to_le_bytes()), None);
        assert_eq!(dev.write(0, &[1]), None);
        assert_eq!(dev.state.bad_calls(), 3);
    }
}
