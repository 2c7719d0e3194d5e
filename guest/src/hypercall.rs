//! Driver for Popek's hypercall device (docs/hypercall.md). Detected once at boot with
//! CPUID in ring 0 (on PVM hosts ring-3 CPUID may reach the host CPU unfiltered); when it
//! is absent, as under QEMU, the console falls back to the UART.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};
use popek_abi::hypercall::{self as hc, Request};
use popek_abi::{ports, CPUID_FEATURES_LEAF, CPUID_SIGNATURE, CPUID_SIGNATURE_LEAF};

static PRESENT: AtomicBool = AtomicBool::new(false);
/// Set by `console=serial` on the command line: keep the console on the UART.
static FORCE_SERIAL: AtomicBool = AtomicBool::new(false);

fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid(leaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Looks for Popek's CPUID signature and features leaf. Call in ring 0 at boot.
pub fn detect() {
    let [max, b, c, d] = cpuid(CPUID_SIGNATURE_LEAF);
    let mut signature = [0u8; 12];
    signature[..4].copy_from_slice(&b.to_le_bytes());
    signature[4..8].copy_from_slice(&c.to_le_bytes());
    signature[8..].copy_from_slice(&d.to_le_bytes());
    if signature != CPUID_SIGNATURE || max < CPUID_FEATURES_LEAF {
        return;
    }
    // The ports are fixed by ABI version 1; CPUID confirms them. Using them as constants
    // keeps a call to `mov dx, imm; out`, which matters where ring 0 is emulated.
    let [_features, port, version, doorbell] = cpuid(CPUID_FEATURES_LEAF);
    let expected = (u32::from(ports::HYPERCALL), u32::from(ports::DOORBELL));
    if u64::from(version) != hc::VERSION_1 || (port, doorbell) != expected {
        return;
    }
    PRESENT.store(true, Ordering::Relaxed);
}

/// Whether the hypercall device is there.
pub fn present() -> bool {
    PRESENT.load(Ordering::Relaxed)
}

/// Keeps console output on the UART even when the device is present.
pub fn force_serial_console() {
    FORCE_SERIAL.store(true, Ordering::Relaxed);
}

/// Whether console output goes through CONSOLE_WRITE.
pub fn console_available() -> bool {
    present() && !FORCE_SERIAL.load(Ordering::Relaxed)
}

/// Issues a raw request: `out` of `block_gpa` to the hypercall port.
#[inline(always)]
pub fn raw_out(block_gpa: u32) {
    let port = ports::HYPERCALL;
    // SAFETY: the VMM reads and writes guest memory during the `out`; no `nomem`, so the
    // compiler keeps memory consistent around it.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") block_gpa, options(nostack, preserves_flags)) }
}

/// Makes one hypercall; returns `ret` (negative errno on failure). Identity mapping makes
/// the block's address its guest-physical address.
#[inline(always)]
pub fn call(nr: u64, args: [u64; 4]) -> i64 {
    let mut request = Request { nr, args, ret: i64::MIN };
    let gpa = &mut request as *mut Request as u64;
    raw_out(gpa as u32);
    // SAFETY: `request` is live; the VMM wrote `ret` during the out.
    unsafe { core::ptr::read_volatile(&request.ret) }
}

/// A request block kept ready for a call repeated with the same arguments (a per-CPU block
/// in a real driver): each call is then just the `out` and one load of `ret`, which
/// matters where every guest ring-0 instruction is emulated.
pub struct Prepared {
    request: Request,
}

impl Prepared {
    pub const fn new(nr: u64, args: [u64; 4]) -> Self {
        Prepared { request: Request { nr, args, ret: i64::MIN } }
    }

    /// Makes the call; returns `ret`.
    #[inline(always)]
    pub fn call(&mut self) -> i64 {
        raw_out(&mut self.request as *mut Request as u32);
        // SAFETY: the VMM wrote `ret` during the out.
        unsafe { core::ptr::read_volatile(&self.request.ret) }
    }
}

/// Writes bytes to the console in one call per 64 KiB.
pub fn console_write(bytes: &[u8]) {
    for chunk in bytes.chunks(hc::CONSOLE_WRITE_MAX as usize) {
        call(hc::CONSOLE_WRITE, [chunk.as_ptr() as u64, chunk.len() as u64, 0, 0]);
    }
}

/// Rings the doorbell (no exit to the VMM on hosts with ioeventfd).
#[inline(always)]
pub fn ring_doorbell() {
    crate::io::outl(ports::DOORBELL, 1);
}

/// Host CLOCK_MONOTONIC in ns.
pub fn monotonic_ns() -> u64 {
    call(hc::CLOCK, [hc::CLOCK_MONOTONIC, 0, 0, 0]) as u64
}
