//! Trap-and-emulate test programs: MSRs emulated by the VMM (`msr`), what CPUID shows in
//! ring 0 and ring 3 (`cpuid`).

use crate::cpu::{self, catch};
use crate::io::exit;
use crate::println;
use crate::programs::Context;
use core::arch::asm;
use popek_abi::exit_status::{FAILURE, SUCCESS};

const BLOCK: u32 = 0x5050_0000;
const IDENTITY: u64 = u64::from_le_bytes(*b"POPEK\0\0\0");
const GP: u64 = 13;

/// RDMSR (2 bytes); `Err(vector)` if it faulted.
fn rdmsr(index: u32) -> Result<u64, u64> {
    let (mut lo, mut hi) = (0u32, 0u32);
    // SAFETY: a possibly-faulting RDMSR under `catch`, which skips it on a fault.
    let vector = catch(2, || unsafe {
        asm!("rdmsr", in("ecx") index, inout("eax") lo, inout("edx") hi, options(nomem, nostack));
    });
    match vector {
        Some(v) => Err(v),
        None => Ok(u64::from(hi) << 32 | u64::from(lo)),
    }
}

/// WRMSR (2 bytes); `Err(vector)` if it faulted.
fn wrmsr(index: u32, value: u64) -> Result<(), u64> {
    // SAFETY: as for `rdmsr`.
    let vector = catch(2, || unsafe {
        asm!("wrmsr", in("ecx") index, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack));
    });
    vector.map_or(Ok(()), Err)
}

/// How an MSR access ended, as the test prints it: the value, or the exception.
struct Outcome(Result<u64, u64>);

impl core::fmt::Display for Outcome {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Ok(v) => write!(f, "{:#x}", v),
            Err(GP) => write!(f, "#GP"),
            Err(v) => write!(f, "exception-{}", v),
        }
    }
}

/// Ring 0: Popek's MSR block and an MSR nobody implements.
pub fn msr_test(_: &Context) -> u8 {
    let identity = rdmsr(BLOCK);
    let version = rdmsr(BLOCK + 1);
    let scratch = wrmsr(BLOCK + 3, 0x1234_5678_9abc_def0).and_then(|()| rdmsr(BLOCK + 3));
    let readonly = wrmsr(BLOCK, 1);
    let unknown_read = rdmsr(0x0001_2345);
    let unknown_write = wrmsr(0x0001_2345, 7);
    println!(
        "msr: identity={} version={} scratch={} readonly-write={} unknown-read={} unknown-write={}",
        Outcome(identity),
        Outcome(version),
        Outcome(scratch),
        Outcome(readonly.map(|()| 0)),
        Outcome(unknown_read),
        Outcome(unknown_write.map(|()| 0)),
    );
    let block_ok =
        identity == Ok(IDENTITY) && version == Ok(1) && scratch == Ok(0x1234_5678_9abc_def0) && readonly == Err(GP);
    if block_ok {
        SUCCESS
    } else {
        FAILURE
    }
}

fn signature(leaf: u32) -> ([u8; 12], u32) {
    let r = core::arch::x86_64::__cpuid(leaf);
    let mut s = [0u8; 12];
    s[..4].copy_from_slice(&r.ebx.to_le_bytes());
    s[4..8].copy_from_slice(&r.ecx.to_le_bytes());
    s[8..].copy_from_slice(&r.edx.to_le_bytes());
    (s, r.eax)
}

fn print_cpuid(ring: u8) {
    let (sig, max) = signature(0x4000_0000);
    let f = core::arch::x86_64::__cpuid(0x4000_0001);
    let text = core::str::from_utf8(&sig).unwrap_or("<binary>");
    println!(
        "cpuid: ring{} signature={:?} max-leaf={:#x} features={:#x} port={:#x} version={}",
        ring, text, max, f.eax, f.ebx, f.ecx
    );
}

/// CPUID seen from ring 0 (always the guest's CPUID), then from ring 3 (on PVM hosts
/// ring 3 runs natively, where CPUID may not trap: a sensitive, unprivileged instruction).
pub fn cpuid_test(_: &Context) -> u8 {
    print_cpuid(0);
    cpu::enter_user(cpuid_user)
}

extern "C" fn cpuid_user() -> ! {
    print_cpuid(3);
    exit(SUCCESS)
}

/// Ring 0: `iterations=N` port-I/O exits to Popek's null device in a tight loop, timed with
/// the host clock; the counterpart of tools/exit-bench's bare KVM_RUN loop.
pub fn exit_loop(context: &Context) -> u8 {
    let n = crate::start_info::arg(context.cmdline, "iterations")
        .and_then(crate::start_info::parse_number)
        .unwrap_or(100_000);
    let start = crate::hypercall::monotonic_ns();
    for _ in 0..n {
        crate::io::outb(popek_abi::ports::NULL, 0);
    }
    let ns = crate::hypercall::monotonic_ns() - start;
    println!("exitloop: {} exits in {} ns, ns_per_exit={}", n, ns, ns / n.max(1));
    SUCCESS
}
