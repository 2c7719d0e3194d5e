//! The migration workload (ring 3): stamps a working set of pages pass after pass, checks
//! every stamp of the previous pass before writing the next, watches the generation word
//! the VMM updates after a migration, and measures the longest gap in its own progress
//! against the host clock (the guest-observed blackout). After the move it verifies the
//! whole working set once more and exits.
//!
//! `pages=all` takes all RAM above 16 MiB; `access=read` stamps once and then only reads
//! (verifies) pass after pass; `order=random` visits the pages of each pass in
//! a scattered order (a fixed permutation), the worst case for post-copy. It prints its
//! throughput before the move, in its first pass after it (post-copy: while memory still
//! arrives) and over the passes after.

use crate::hypercall::{call, monotonic_ns};
use crate::println;
use crate::programs::Context;
use crate::start_info::{arg, parse_number};
use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use popek_abi::exit_status::{FAILURE, SUCCESS};
use popek_abi::hypercall as hc;

/// The working set starts at 16 MiB, above the kernel and its tables.
const WORKING_SET: u64 = 16 << 20;
const PAGE: u64 = 4096;

static mut GENERATION: u64 = 0;

fn stamp(round: u64, page: u64) -> u64 {
    (round << 32) | page
}

/// The order a pass visits pages in: `page(i) = i * step % pages`, a permutation when
/// `step` and `pages` share no factor (step 1: in order).
#[derive(Clone, Copy)]
struct Order {
    pages: u64,
    step: u64,
}

impl Order {
    fn new(pages: u64, random: bool) -> Order {
        let gcd = |mut a: u64, mut b: u64| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let mut step = if random && pages > 2 { 1_000_003 % pages } else { 1 };
        while step > 1 && gcd(step, pages) != 1 {
            step += 1;
        }
        Order { pages, step: step.max(1) }
    }

    fn page(&self, i: u64) -> u64 {
        ((u128::from(i) * u128::from(self.step)) % u128::from(self.pages)) as u64
    }
}

/// Checks that every page holds the stamp of `round`; returns the first bad page.
fn verify(order: Order, round: u64) -> Result<(), (u64, u64)> {
    for i in 0..order.pages {
        let page = order.page(i);
        let addr = WORKING_SET + page * PAGE;
        // SAFETY: identity-mapped guest RAM reserved for the workload.
        let (head, tail) =
            unsafe { (read_volatile(addr as *const u64), read_volatile((addr + PAGE - 8) as *const u64)) };
        if head != stamp(round, page) || tail != !stamp(round, page) {
            return Err((page, head));
        }
    }
    Ok(())
}

fn write(order: Order, round: u64) {
    for i in 0..order.pages {
        let page = order.page(i);
        let addr = WORKING_SET + page * PAGE;
        // SAFETY: as in `verify`.
        unsafe {
            write_volatile(addr as *mut u64, stamp(round, page));
            write_volatile((addr + PAGE - 8) as *mut u64, !stamp(round, page));
        }
    }
}

pub fn migrate_workload(context: &Context) -> u8 {
    let ram = context.info.map_or(0, |i| i.ram_bytes());
    let pages = match arg(context.cmdline, "pages") {
        Some(b"all") => ram.saturating_sub(WORKING_SET) / PAGE,
        other => other.and_then(parse_number).unwrap_or(4096),
    };
    let order = Order::new(pages, arg(context.cmdline, "order") == Some(b"random"));
    // access=read: stamp once, then only read (verify) pass after pass.
    let read_only = arg(context.cmdline, "access") == Some(b"read");
    let next = |round: u64| {
        if read_only {
            round
        } else {
            write(order, round + 1);
            round + 1
        }
    };
    let seconds = arg(context.cmdline, "seconds").and_then(parse_number).unwrap_or(60);
    let moves = arg(context.cmdline, "moves").and_then(parse_number).unwrap_or(1);
    // rate=N: stamp at most N pages per second (0: as fast as it can).
    let rate = arg(context.cmdline, "rate").and_then(parse_number).unwrap_or(0);
    if WORKING_SET + pages * PAGE > ram {
        println!("migrate: {} pages do not fit in {} bytes of RAM", pages, ram);
        return FAILURE;
    }
    if !crate::hypercall::present() {
        return baseline(order, next);
    }
    let generation = addr_of_mut!(GENERATION) as u64;
    if call(hc::REGISTER_GENERATION, [generation, 0, 0, 0]) != 0 {
        println!("migrate: cannot register the generation word");
        return FAILURE;
    }
    // SAFETY: the VMM writes this word; read volatile.
    let mut start_generation = unsafe { read_volatile(generation as *const u64) };
    let mut moved = 0;
    write(order, 0);
    let start = monotonic_ns();
    let mut last = start;
    let mut longest_gap = 0;
    let (mut round, mut passes) = (0, 0u64);
    // Throughput before a move: passes since `since_ns` (each a verify and a write).
    let (mut since_ns, mut since_pass) = (start, 0);
    println!("migrate: ready, {} pages stamped, generation {}", pages, start_generation);
    loop {
        if let Err((page, found)) = verify(order, round) {
            println!("migrate: CORRUPT page {} of round {}: found {:#x}", page, round, found);
            return FAILURE;
        }
        let pass_start = monotonic_ns();
        round = next(round);
        passes += 1;
        // Spread the pass over pages/rate seconds, sleeping in the VMM for the rest.
        if let Some(due) = (pages * 1_000_000_000).checked_div(rate) {
            let spent = monotonic_ns() - pass_start;
            if due > spent {
                call(hc::SLEEP, [(due - spent).min(hc::SLEEP_MAX_NS), 0, 0, 0]);
            }
        }
        let now = monotonic_ns();
        longest_gap = longest_gap.max(now - last);
        last = now;
        // SAFETY: as above.
        let generation_now = unsafe { read_volatile(generation as *const u64) };
        if generation_now != start_generation {
            let per_ms = |passes: u64, ns: u64| passes * pages * 1_000_000 / ns.max(1);
            let before = per_ms(passes - since_pass, now - since_ns);
            // The pause may have fallen after this pass's clock reading: measure once more,
            // then keep working for a while on the new host before the final check.
            let (mut first_pass, after_start) = (0, monotonic_ns());
            for pass in 0..100 {
                if verify(order, round).is_err() {
                    break;
                }
                round = next(round);
                let now = monotonic_ns();
                if pass == 0 {
                    first_pass = per_ms(1, now - after_start);
                }
                longest_gap = longest_gap.max(now - last);
                last = now;
            }
            let after = per_ms(100, last - after_start);
            println!(
                "migrate: throughput (pages/ms): before the move {}, first pass after it {}, 100 passes after it {}",
                before, first_pass, after
            );
            let verified = verify(order, round);
            println!(
                "migrate: moved (generation {}) after {} rounds; {} pages verified: {}; longest pause {} us",
                generation_now,
                passes,
                pages,
                if verified.is_ok() { "ok" } else { "CORRUPT" },
                longest_gap / 1000
            );
            moved += 1;
            if verified.is_err() || moved >= moves {
                return if verified.is_ok() { SUCCESS } else { FAILURE };
            }
            start_generation = generation_now;
            longest_gap = 0;
            (since_ns, since_pass) = (monotonic_ns(), passes);
        }
        if now - start > seconds * 1_000_000_000 {
            println!("migrate: not moved within {} s ({} rounds)", seconds, passes);
            return FAILURE;
        }
    }
}

/// Without Popek's device (another VMM, for a side-by-side benchmark) there is no host
/// clock and no generation word: stamp and verify pass after pass for ever, say so at
/// once if a page is wrong, and print a sign of life about every 2^31 TSC cycles so the
/// benchmark sees the guest go on after the move.
fn baseline(order: Order, next: impl Fn(u64) -> u64) -> u8 {
    write(order, 0);
    println!("migrate: ready, {} pages stamped (no Popek device: checking continuously)", order.pages);
    let (mut round, mut passes, mut last) = (0, 0u64, tsc());
    loop {
        if let Err((page, found)) = verify(order, round) {
            println!("migrate: CORRUPT page {} of round {}: found {:#x}", page, round, found);
            return FAILURE;
        }
        round = next(round);
        passes += 1;
        if tsc().wrapping_sub(last) > 1 << 31 {
            println!("migrate: alive, {} passes verified", passes);
            last = tsc();
        }
    }
}

fn tsc() -> u64 {
    // SAFETY: rdtsc has no side effects (and is allowed in ring 3: CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}
