//! The test programs. `test=NAME` on the command line picks one; most run in ring 3, where
//! they run natively even on hosts that emulate guest ring 0.

use crate::io::{self, exit};
use crate::start_info::{arg, parse_number, StartInfo};
use crate::{cpu, println, smp};
use core::ptr::{addr_of, addr_of_mut};
use popek_abi::exit_status::{BAD_COMMAND_LINE, FAILURE, SUCCESS};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ring {
    Kernel,
    User,
}

/// What a program gets to look at.
#[derive(Clone, Copy)]
pub struct Context {
    pub info: Option<StartInfo>,
    pub cmdline: &'static [u8],
}

struct Program {
    name: &'static str,
    ring: Ring,
    about: &'static str,
    run: fn(&Context) -> u8,
}

const PROGRAMS: &[Program] = &[
    Program { name: "hello", ring: Ring::User, about: "print a line from ring 3", run: hello },
    Program { name: "exit", ring: Ring::User, about: "exit with code=N", run: exit_with },
    Program { name: "echo", ring: Ring::User, about: "read a console line, print it", run: echo },
    Program { name: "mem", ring: Ring::User, about: "print RAM size from the memory map", run: mem },
    Program { name: "initrd", ring: Ring::User, about: "print boot module 0", run: initrd },
    Program { name: "rom", ring: Ring::User, about: "write the firmware ROM, check it held", run: rom },
    Program { name: "reset", ring: Ring::User, about: "ask the i8042 for a reset", run: reset },
    Program { name: "probe", ring: Ring::User, about: "touch a port no device owns", run: probe },
    Program {
        name: "hypercall",
        ring: Ring::User,
        about: "every hypercall and its error paths",
        run: crate::hyper_tests::hypercall_test,
    },
    Program {
        name: "hyperfuzz",
        ring: Ring::User,
        about: "random and malformed hypercalls (iterations=N)",
        run: crate::hyper_tests::hyperfuzz,
    },
    Program {
        name: "hyperbench",
        ring: Ring::Kernel,
        about: "hypercall latency and console throughput (iterations=N)",
        run: crate::hyper_tests::hyperbench,
    },
    Program {
        name: "msr",
        ring: Ring::Kernel,
        about: "Popek's emulated MSR block and an unknown MSR",
        run: crate::trap_tests::msr_test,
    },
    Program {
        name: "cpuid",
        ring: Ring::Kernel,
        about: "the hypervisor CPUID leaves from ring 0 and ring 3",
        run: crate::trap_tests::cpuid_test,
    },
    Program {
        name: "traps",
        ring: Ring::Kernel,
        about: "the trap suite: sensitive and privileged instructions in ring 0 and 3",
        run: crate::trap_suite::trap_suite,
    },
    Program {
        name: "hostile",
        ring: Ring::Kernel,
        about: "random ports, MMIO, MSRs, privileged instructions (iterations=N)",
        run: crate::hostile::hostile,
    },
    Program {
        name: "exitloop",
        ring: Ring::Kernel,
        about: "time port-I/O exits to the null device (iterations=N)",
        run: crate::trap_tests::exit_loop,
    },
    Program {
        name: "migrate",
        ring: Ring::User,
        about: "stamp and verify pages until migrated (pages=N seconds=S)",
        run: crate::migrate_workload::migrate_workload,
    },
    Program { name: "smp", ring: Ring::Kernel, about: "start every CPU of the MP table", run: smp_test },
    Program { name: "triple-fault", ring: Ring::Kernel, about: "shut the CPU down", run: triple },
];

static mut SELECTED: Option<(&'static Program, Context)> = None;

/// Runs the program the command line asks for (`hello` by default) and exits with its status.
pub fn run(info: Option<StartInfo>, cmdline: &'static [u8]) -> ! {
    let name = arg(cmdline, "test").unwrap_or(b"hello");
    let Some(program) = PROGRAMS.iter().find(|p| p.name.as_bytes() == name) else {
        print_usage(name);
        exit(BAD_COMMAND_LINE);
    };
    let context = Context { info, cmdline };
    match program.ring {
        Ring::Kernel => exit((program.run)(&context)),
        Ring::User => {
            // SAFETY: written once, before the only reader (user_main) runs.
            unsafe { *addr_of_mut!(SELECTED) = Some((program, context)) };
            cpu::enter_user(user_main)
        }
    }
}

extern "C" fn user_main() -> ! {
    // SAFETY: written by `run` before entering ring 3; never written again.
    match unsafe { *addr_of!(SELECTED) } {
        Some((program, context)) => exit((program.run)(&context)),
        None => exit(FAILURE),
    }
}

fn print_usage(name: &[u8]) {
    println!("guest: unknown test '{}'; tests:", core::str::from_utf8(name).unwrap_or("?"));
    for p in PROGRAMS {
        println!("  {:<14} {}", p.name, p.about);
    }
}

fn hello(_: &Context) -> u8 {
    println!("hello from ring 3");
    SUCCESS
}

fn exit_with(context: &Context) -> u8 {
    match arg(context.cmdline, "code").and_then(parse_number) {
        Some(code) if code <= 255 => code as u8,
        _ => {
            println!("guest: exit needs code=0..255");
            BAD_COMMAND_LINE
        }
    }
}

fn echo(_: &Context) -> u8 {
    let mut line = [0u8; 256];
    let mut len = 0;
    loop {
        let byte = io::read_byte();
        if byte == b'\n' || byte == b'\r' {
            break;
        }
        if len < line.len() {
            line[len] = byte;
            len += 1;
        }
    }
    println!("echo: {}", core::str::from_utf8(&line[..len]).unwrap_or("<not utf-8>"));
    SUCCESS
}

fn mem(context: &Context) -> u8 {
    match context.info {
        Some(info) => {
            println!("mem: {} KiB of RAM", info.ram_bytes() / 1024);
            SUCCESS
        }
        None => {
            println!("mem: no PVH start_info");
            FAILURE
        }
    }
}

fn initrd(context: &Context) -> u8 {
    let Some(module) = context.info.and_then(|i| i.module(0)) else {
        println!("initrd: no module");
        return FAILURE;
    };
    let count = context.info.map_or(0, |i| i.module_count());
    let shown = &module[..module.len().min(64)];
    let text = core::str::from_utf8(shown).unwrap_or("<binary>");
    println!("initrd: {} module(s), {} bytes: {}", count, module.len(), text.trim_end());
    SUCCESS
}

/// Writes over the reset vector at the top of the firmware ROM and reads it back: a ROM
/// mapped read-only keeps its bytes.
fn rom(_: &Context) -> u8 {
    const RESET_VECTOR: u64 = 0xffff_fff0;
    let ptr = RESET_VECTOR as *mut u32;
    // SAFETY: identity-mapped ROM (or unbacked) address; MMIO-style volatile access.
    let before = unsafe { core::ptr::read_volatile(ptr) };
    // SAFETY: as above; the write must not take effect.
    unsafe { core::ptr::write_volatile(ptr, !before) };
    // SAFETY: as above.
    let after = unsafe { core::ptr::read_volatile(ptr) };
    if before == after {
        println!("rom: intact ({:#010x})", after);
        SUCCESS
    } else {
        println!("rom: CHANGED {:#010x} -> {:#010x}", before, after);
        FAILURE
    }
}

fn reset(_: &Context) -> u8 {
    io::outb(popek_abi::ports::I8042_COMMAND, popek_abi::ports::I8042_CMD_RESET);
    println!("reset: still running after the reset request");
    FAILURE
}

/// Reads and writes ports no device claims: the VMM must log and go on, not stop.
fn probe(_: &Context) -> u8 {
    const UNCLAIMED: u16 = 0x510;
    io::outb(UNCLAIMED, 0x42);
    let value = io::inb(UNCLAIMED);
    println!("probe: port {:#x} reads {:#04x}", UNCLAIMED, value);
    SUCCESS
}

fn smp_test(_: &Context) -> u8 {
    let Some(cpus) = smp::discover() else {
        println!("smp: no MP table");
        return FAILURE;
    };
    smp::start_aps(&cpus);
    let expected = cpus.count as u32 - 1;
    // Bounded wait measured in TSC ticks (at least 2 s on any CPU under 4 GHz... and more
    // on slower ones): an AP that never starts must fail the test, not hang it.
    let start = rdtsc();
    while smp::online() < expected && rdtsc().wrapping_sub(start) < 8_000_000_000 {
        core::hint::spin_loop();
    }
    let online = smp::online() + 1;
    println!("smp: {}/{} cpus online", online, cpus.count);
    if online == cpus.count as u32 {
        SUCCESS
    } else {
        FAILURE
    }
}

fn triple(_: &Context) -> u8 {
    println!("triple-fault: going down");
    cpu::triple_fault()
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}
