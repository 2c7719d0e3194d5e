//! Test programs for the hypercall device: every call and error path (`hypercall`), random
//! and malformed calls (`hyperfuzz`), and the latency/throughput benchmark (`hyperbench`).

use crate::hypercall::{self, call, monotonic_ns};
use crate::io::{self, exit};
use crate::programs::Context;
use crate::start_info::{arg, parse_number};
use crate::{cpu, println};
use core::ptr::addr_of_mut;
use popek_abi::exit_status::{FAILURE, SUCCESS};
use popek_abi::hypercall as hc;

#[repr(C, align(4096))]
struct Pages([u8; 4 * 4096]);
static mut SCRATCH: Pages = Pages([0; 4 * 4096]);

fn scratch() -> &'static mut [u8; 4 * 4096] {
    // SAFETY: only the single running test program uses the scratch pages.
    unsafe { &mut (*addr_of_mut!(SCRATCH)).0 }
}

struct Checks {
    passed: u32,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            println!("hypercall: FAILED: {}", what);
            exit(FAILURE);
        }
    }
}

/// Exercises every call, its result and its error paths, then exits through EXIT.
pub fn hypercall_test(_: &Context) -> u8 {
    if !hypercall::present() {
        println!("hypercall: no Popek hypercall device");
        return FAILURE;
    }
    let mut c = Checks { passed: 0 };
    let page = scratch().as_mut_ptr() as u64;
    c.check("VERSION", call(hc::VERSION, [0; 4]) == hc::VERSION_1 as i64);
    c.check("FEATURES", call(hc::FEATURES, [0; 4]) & 0x7f == 0x7f);
    c.check("PING", call(hc::PING, [0; 4]) == 0);
    c.check("unknown number", call(hc::LAST + 1, [0; 4]) == -hc::ENOSYS);
    c.check("huge number", call(u64::MAX, [0; 4]) == -hc::ENOSYS);

    let text = b"hypercall: console write ok\n";
    c.check(
        "CONSOLE_WRITE",
        call(hc::CONSOLE_WRITE, [text.as_ptr() as u64, text.len() as u64, 0, 0]) == text.len() as i64,
    );
    c.check("CONSOLE_WRITE bad gpa", call(hc::CONSOLE_WRITE, [u64::MAX - 4, 8, 0, 0]) == -hc::EFAULT);
    c.check("CONSOLE_WRITE past RAM", call(hc::CONSOLE_WRITE, [1 << 40, 8, 0, 0]) == -hc::EFAULT);
    c.check("CONSOLE_WRITE too long", call(hc::CONSOLE_WRITE, [page, hc::CONSOLE_WRITE_MAX + 1, 0, 0]) == -hc::EINVAL);

    let t0 = monotonic_ns();
    c.check("CLOCK realtime", call(hc::CLOCK, [hc::CLOCK_REALTIME, 0, 0, 0]) > 1_600_000_000_000_000_000);
    c.check("CLOCK bad id", call(hc::CLOCK, [9, 0, 0, 0]) == -hc::EINVAL);
    c.check("SLEEP", call(hc::SLEEP, [20_000_000, 0, 0, 0]) == 0);
    let slept = monotonic_ns().wrapping_sub(t0);
    c.check("SLEEP lasted 20 ms", (20_000_000..5_000_000_000).contains(&slept));
    c.check("SLEEP too long", call(hc::SLEEP, [hc::SLEEP_MAX_NS + 1, 0, 0, 0]) == -hc::EINVAL);
    c.check("YIELD", call(hc::YIELD, [0; 4]) == 0);

    let buf = scratch();
    buf[..128].fill(0);
    c.check("RANDOM", call(hc::RANDOM, [page, 64, 0, 0]) == 64);
    c.check("RANDOM", call(hc::RANDOM, [page + 64, 64, 0, 0]) == 64);
    c.check("RANDOM filled", buf[..64].iter().any(|&b| b != 0) && buf[..64] != buf[64..128]);
    c.check("RANDOM bad gpa", call(hc::RANDOM, [1 << 40, 64, 0, 0]) == -hc::EFAULT);
    c.check("RANDOM too long", call(hc::RANDOM, [page, hc::RANDOM_MAX + 1, 0, 0]) == -hc::EINVAL);

    c.check("FREE_PAGE_HINT", call(hc::FREE_PAGE_HINT, [page, 4, 0, 0]) == 4);
    c.check("FREE_PAGE_HINT again", call(hc::FREE_PAGE_HINT, [page, 4, 0, 0]) == 0);
    c.check("FREE_PAGE_UNHINT", call(hc::FREE_PAGE_UNHINT, [page, 4, 0, 0]) == 4);
    c.check("FREE_PAGE_HINT unaligned", call(hc::FREE_PAGE_HINT, [page + 1, 1, 0, 0]) == -hc::EINVAL);
    c.check("FREE_PAGE_HINT zero pages", call(hc::FREE_PAGE_HINT, [page, 0, 0, 0]) == -hc::EINVAL);
    c.check("FREE_PAGE_HINT overflow", call(hc::FREE_PAGE_HINT, [page, u64::MAX / 2, 0, 0]) == -hc::EINVAL);
    c.check("FREE_PAGE_HINT past RAM", call(hc::FREE_PAGE_HINT, [1 << 40, 1, 0, 0]) == -hc::EFAULT);

    c.check("GENERATION", call(hc::GENERATION, [0; 4]) == 0);
    let generation = page + 256;
    // SAFETY: scratch memory of this program.
    unsafe { core::ptr::write_volatile(generation as *mut u64, u64::MAX) };
    c.check("REGISTER_GENERATION", call(hc::REGISTER_GENERATION, [generation, 0, 0, 0]) == 0);
    // SAFETY: as above; the VMM wrote the generation there.
    c.check("generation written", unsafe { core::ptr::read_volatile(generation as *const u64) } == 0);
    c.check("REGISTER_GENERATION unaligned", call(hc::REGISTER_GENERATION, [generation + 4, 0, 0, 0]) == -hc::EINVAL);
    c.check("REGISTER_GENERATION bad gpa", call(hc::REGISTER_GENERATION, [1 << 40, 0, 0, 0]) == -hc::EFAULT);

    let before = call(hc::DOORBELL_COUNT, [0; 4]);
    for _ in 0..3 {
        hypercall::ring_doorbell();
    }
    let start = monotonic_ns();
    while call(hc::DOORBELL_COUNT, [0; 4]) < before + 3 && monotonic_ns() - start < 2_000_000_000 {
        call(hc::YIELD, [0; 4]);
    }
    c.check("DOORBELL counted", call(hc::DOORBELL_COUNT, [0; 4]) == before + 3);

    c.check("EXIT bad status", call(hc::EXIT, [256, 0, 0, 0]) == -hc::EINVAL);
    println!("hypercall: {} checks passed", c.passed);
    call(hc::EXIT, [SUCCESS as u64, 0, 0, 0]);
    println!("hypercall: FAILED: EXIT returned");
    FAILURE
}

/// xorshift64*: deterministic from a seed the host provides.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Fires random and malformed calls; every result must be a documented one, and the VMM
/// must stay up to see the final EXIT.
pub fn hyperfuzz(context: &Context) -> u8 {
    if !hypercall::present() {
        println!("hyperfuzz: no Popek hypercall device");
        return FAILURE;
    }
    let iterations = arg(context.cmdline, "iterations").and_then(parse_number).unwrap_or(20_000);
    let ram = context.info.map_or(0, |i| i.ram_bytes());
    let mut seed = 0u64;
    call(hc::RANDOM, [&mut seed as *mut u64 as u64, 8, 0, 0]);
    let mut rng = Rng(seed | 1);
    let (mut ok, mut efault, mut einval, mut enosys, mut raw) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for _ in 0..iterations {
        let choice = rng.next();
        if choice.is_multiple_of(8) {
            // A malformed request block address: unaligned, or past the end of RAM (never a
            // valid block: the VMM would otherwise write `ret` into random guest memory).
            let bad = if choice & 8 != 0 {
                (rng.next() as u32) | 1
            } else {
                (ram as u32).saturating_add(rng.next() as u32 % 0x1000_0000) & !7
            };
            hypercall::raw_out(bad);
            raw += 1;
            continue;
        }
        // Calls that would end the VM or sleep for long are given safe arguments.
        let nr = rng.next() % (hc::LAST + 8);
        let mut args = [rng.next(), rng.next(), rng.next(), rng.next()];
        match nr {
            hc::EXIT => args[0] = 256 + (args[0] >> 1),
            hc::SLEEP => args[0] %= 1000,
            // Addresses of any writing call stay outside RAM or unaligned.
            hc::RANDOM | hc::REGISTER_GENERATION | hc::FREE_PAGE_HINT | hc::FREE_PAGE_UNHINT => args[0] |= 1 << 40,
            _ => {}
        }
        let ret = call(nr, args);
        match ret {
            r if r >= 0 => ok += 1,
            r if r == -hc::EFAULT => efault += 1,
            r if r == -hc::EINVAL => einval += 1,
            r if r == -hc::ENOSYS && nr > hc::LAST => enosys += 1,
            other => {
                println!("hyperfuzz: call {} returned undocumented {}", nr, other);
                return FAILURE;
            }
        }
    }
    let alive = call(hc::PING, [0; 4]) == 0;
    println!(
        "hyperfuzz: {} calls, ok={} efault={} einval={} enosys={} bad-blocks={} vmm-alive={}",
        iterations, ok, efault, einval, enosys, raw, alive
    );
    if alive {
        SUCCESS
    } else {
        FAILURE
    }
}

const MAX_SAMPLES: usize = 100_000;
/// Per-call TSC samples: ring-0 null port, ping, doorbell; then the same in ring 3.
static mut SAMPLES: [[u32; MAX_SAMPLES]; 6] = [[0; MAX_SAMPLES]; 6];
static mut BENCH_ITERATIONS: usize = 0;
static mut BENCH_START: (u64, u64) = (0, 0);

fn rdtsc() -> u64 {
    // SAFETY: no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Times `iterations` runs of `op`, one TSC sample each, into sample row `row`.
#[inline(always)]
fn sample(row: usize, iterations: usize, op: impl Fn()) {
    // SAFETY: the benchmark is the only user of SAMPLES; rows are disjoint.
    let samples = unsafe { &mut (*addr_of_mut!(SAMPLES))[row] };
    for slot in samples.iter_mut().take(iterations) {
        let t0 = rdtsc();
        op();
        *slot = rdtsc().wrapping_sub(t0) as u32;
    }
}

fn null_port() {
    io::outl(popek_abi::ports::NULL, 0);
}

static mut PING: hypercall::Prepared = hypercall::Prepared::new(hc::PING, [0; 4]);

fn ping() {
    // SAFETY: single-threaded benchmark; only this function touches PING.
    unsafe { (*addr_of_mut!(PING)).call() };
}

/// The benchmark starts in ring 0 (the kernel's path), then measures ring 3 and reports.
pub fn hyperbench(context: &Context) -> u8 {
    if !hypercall::present() {
        println!("hyperbench: no Popek hypercall device");
        return FAILURE;
    }
    let iterations = arg(context.cmdline, "iterations").and_then(parse_number).unwrap_or(20_000) as usize;
    let iterations = iterations.min(MAX_SAMPLES);
    // SAFETY: written before ring 3 reads it.
    unsafe {
        BENCH_ITERATIONS = iterations;
        BENCH_START = (monotonic_ns(), rdtsc());
    }
    sample(0, iterations, null_port);
    sample(1, iterations, ping);
    sample(2, iterations, hypercall::ring_doorbell);
    cpu::enter_user(hyperbench_user)
}

extern "C" fn hyperbench_user() -> ! {
    // SAFETY: set by `hyperbench` before entering ring 3.
    let (iterations, (ns0, tsc0)) = unsafe { (BENCH_ITERATIONS, BENCH_START) };
    sample(3, iterations, null_port);
    sample(4, iterations, ping);
    sample(5, iterations, hypercall::ring_doorbell);
    let ns_per_tick = (monotonic_ns() - ns0) as f64 / (rdtsc() - tsc0) as f64;
    let names = ["ring0 null-port", "ring0 ping", "ring0 doorbell", "ring3 null-port", "ring3 ping", "ring3 doorbell"];
    for (row, name) in names.iter().enumerate() {
        // SAFETY: sampling is over; only this loop touches SAMPLES now.
        let samples = unsafe { &mut (&mut (*addr_of_mut!(SAMPLES))[row])[..iterations] };
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize] as f64 * ns_per_tick;
        println!("bench latency {} n={} median_ns={} p99_ns={}", name, iterations, at(0.5) as u64, at(0.99) as u64);
    }
    console_throughput();
    exit(SUCCESS)
}

/// The same bytes through the UART (one exit per byte) and CONSOLE_WRITE (one per 4 KiB).
fn console_throughput() {
    const BYTES: usize = 16 * 1024;
    let buf = scratch();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = if i % 64 == 63 { b'\n' } else { b'.' };
    }
    let t0 = monotonic_ns();
    io::serial_write(&buf[..BYTES]);
    let serial_ns = monotonic_ns() - t0;
    let t0 = monotonic_ns();
    for chunk in buf[..BYTES].chunks(4096) {
        hypercall::console_write(chunk);
    }
    let hypercall_ns = monotonic_ns() - t0;
    println!("bench console uart bytes={} ns={}", BYTES, serial_ns);
    println!("bench console hypercall bytes={} ns={}", BYTES, hypercall_ns);
}
