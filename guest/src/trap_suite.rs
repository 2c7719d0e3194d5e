//! The trap suite: Robin and Irvine's 17 sensitive-unprivileged instructions and the
//! privileged ones, each run in ring 0, in ring 3, and in ring 3 again with CR4.TSD and
//! (where the CPU has it) CR4.UMIP set. For each it records what happened: ran silently
//! (`ok`, or `differs` when the result is not what ring 0 saw), trapped in the guest
//! (`#GP`, `#UD`, ...), and whether it reached the VMM (`+exit`). Prints one line per
//! instruction; tests/traps.rs compares them with the expected table for the host kind.

use crate::cpu::catch;
use crate::hypercall::call;
use crate::io::exit;
use crate::programs::Context;
use crate::{cpu, print, println};
use core::arch::asm;
use core::ptr::{addr_of, addr_of_mut};
use popek_abi::exit_status::SUCCESS;
use popek_abi::hypercall as hc;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cell {
    NotRun,
    Ran { value: u64, exits: u64 },
    Trapped { vector: u64, exits: u64 },
}

/// One instruction under test: `skip` is the length of the one instruction that may fault.
struct Row {
    name: &'static str,
    skip: u64,
    /// Whether a different result in ring 3 means something (false for clocks).
    compare: bool,
    ring0: bool,
    run: fn() -> u64,
}

const PHASES: usize = 3;
const ROWS: usize = 39;
static mut RESULTS: [[Cell; PHASES]; ROWS] = [[Cell::NotRun; PHASES]; ROWS];
static mut SAVED: Saved = Saved { gdtr: [0; 10], idtr: [0; 10], cr0: 0 };
static mut UMIP: bool = false;
/// Set by ring 3 before `int3` to ask the kernel for phase 2 (CR4.TSD and UMIP on).
pub static mut PHASE_SWITCH: bool = false;
static mut BUF: [u8; 16] = [0; 16];

struct Saved {
    gdtr: [u8; 10],
    idtr: [u8; 10],
    cr0: u64,
}

const SEL_KERNEL_CODE: u64 = 0x08;
const SEL_KERNEL_DATA: u64 = 0x10;
const NULL_PORT: u64 = popek_abi::ports::NULL as u64;

fn buf() -> u64 {
    addr_of_mut!(BUF) as u64
}

macro_rules! row {
    ($name:expr, $skip:expr, $compare:expr, $ring0:expr, $body:expr) => {
        Row { name: $name, skip: $skip, compare: $compare, ring0: $ring0, run: $body }
    };
}

// SAFETY (all rows): each asm block runs one instruction that may fault; `catch` skips it
// by its exact encoded length, which the fixed registers below pin down.
const TABLE: [Row; ROWS] = [
    row!("sgdt", 3, true, true, || unsafe {
        asm!("sgdt [rdi]", in("rdi") buf(), options(nostack));
        u64::from_le_bytes(BUF[2..10].try_into().unwrap_or([0; 8]))
    }),
    row!("sidt", 3, true, true, || unsafe {
        asm!("sidt [rdi]", in("rdi") buf(), options(nostack));
        u64::from_le_bytes(BUF[2..10].try_into().unwrap_or([0; 8]))
    }),
    row!("sldt", 3, true, true, || {
        let v: u64;
        unsafe { asm!("xor eax, eax", "sldt eax", out("rax") v, options(nostack)) };
        v
    }),
    row!("smsw", 3, true, true, || {
        let v: u64;
        unsafe { asm!("xor eax, eax", "smsw eax", out("rax") v, options(nostack)) };
        v & 0xffff
    }),
    row!("str", 3, true, true, || {
        let v: u64;
        unsafe { asm!("xor eax, eax", "str eax", out("rax") v, options(nostack)) };
        v
    }),
    row!("pushf", 1, true, true, || {
        let v: u64;
        unsafe { asm!("pushfq", "pop rax", out("rax") v) };
        v & 0x3200
    }),
    row!("popf", 1, true, true, || {
        let v: u64;
        unsafe { asm!("pushfq", "pop rax", "or rax, 0x200", "push rax", "popfq", "pushfq", "pop rax", out("rax") v) };
        v & 0x200
    }),
    row!("lar", 3, true, true, || {
        let v: u64;
        unsafe {
            asm!("xor edx, edx", "lar eax, ecx", "setz dl", in("ecx") SEL_KERNEL_CODE, out("eax") _, out("rdx") v, options(nostack))
        };
        v
    }),
    row!("lsl", 3, true, true, || {
        let v: u64;
        unsafe {
            asm!("xor edx, edx", "lsl eax, ecx", "setz dl", in("ecx") SEL_KERNEL_CODE, out("eax") _, out("rdx") v, options(nostack))
        };
        v
    }),
    row!("verr", 3, true, true, || {
        let v: u64;
        unsafe {
            asm!("xor edx, edx", "verr cx", "setz dl", in("ecx") SEL_KERNEL_DATA, out("rdx") v, options(nostack))
        };
        v
    }),
    row!("verw", 3, true, true, || {
        let v: u64;
        unsafe {
            asm!("xor edx, edx", "verw cx", "setz dl", in("ecx") SEL_KERNEL_DATA, out("rdx") v, options(nostack))
        };
        v
    }),
    row!("push-fs", 2, true, true, || {
        let v: u64;
        unsafe { asm!(".byte 0x0f, 0xa0", "pop rax", out("rax") v) };
        v
    }),
    row!("pop-fs", 2, true, true, || {
        let v: u64;
        unsafe {
            asm!("mov r11, rsp", "push rax", ".byte 0x0f, 0xa1", "mov rsp, r11", "mov eax, fs", "xor ecx, ecx", "mov fs, ecx", inout("rax") SEL_KERNEL_DATA => v, out("rcx") _, out("r11") _)
        };
        v & 0xffff
    }),
    row!("mov-from-seg", 2, true, true, || {
        let v: u64;
        unsafe { asm!("xor eax, eax", "mov eax, cs", out("rax") v, options(nostack)) };
        v & 0xffff
    }),
    row!("mov-to-seg", 2, true, true, || {
        let v: u64;
        unsafe {
            asm!("mov fs, eax", "mov eax, fs", "xor ecx, ecx", "mov fs, ecx", inout("rax") SEL_KERNEL_DATA => v, out("rcx") _, options(nostack))
        };
        v & 0xffff
    }),
    row!("far-ret", 2, true, true, || {
        unsafe {
            asm!("mov r11, rsp", "lea rax, [rip + 2f]", "push 0x08", "push rax", "retfq", "2:", "mov rsp, r11", out("rax") _, out("r11") _)
        };
        0
    }),
    row!("int-n", 2, true, true, || {
        unsafe { asm!("int 1", "nop", "nop") };
        0
    }),
    row!("int3", 1, true, true, || {
        unsafe { asm!("int3", "nop") };
        0
    }),
    row!("cpuid", 2, true, true, || {
        let v: u64;
        unsafe {
            asm!("mov r10, rbx", "cpuid", "xchg r10, rbx", inout("eax") 0x4000_0000u32 => _, out("ecx") _, out("edx") _, out("r10") v, options(nostack))
        };
        v & 0xffff_ffff
    }),
    row!("rdtsc", 2, false, true, || {
        unsafe { asm!("rdtsc", out("eax") _, out("edx") _, options(nostack)) };
        0
    }),
    row!("rdpmc", 2, false, true, || {
        unsafe { asm!("rdpmc", in("ecx") 0, out("eax") _, out("edx") _, options(nostack)) };
        0
    }),
    row!("hlt", 1, true, false, || {
        unsafe { asm!("hlt", options(nostack)) };
        0
    }),
    row!("cli", 1, true, true, || {
        unsafe { asm!("cli", options(nostack)) };
        0
    }),
    row!("sti", 1, true, true, || {
        unsafe { asm!("sti", options(nostack)) };
        0
    }),
    row!("in", 1, true, true, || {
        unsafe { asm!("in al, dx", in("dx") NULL_PORT as u16, out("al") _, options(nostack)) };
        0
    }),
    row!("out", 1, true, true, || {
        unsafe { asm!("out dx, al", in("dx") NULL_PORT as u16, in("al") 0u8, options(nostack)) };
        0
    }),
    row!("mov-from-cr", 3, true, true, || {
        let v: u64;
        unsafe { asm!("xor eax, eax", "mov rax, cr0", out("rax") v, options(nostack)) };
        v
    }),
    row!("mov-to-cr", 3, true, true, || {
        unsafe { asm!("mov cr0, rax", in("rax") SAVED.cr0, options(nostack)) };
        0
    }),
    row!("mov-from-dr", 3, true, true, || {
        let v: u64;
        unsafe { asm!("xor eax, eax", "mov rax, dr7", out("rax") v, options(nostack)) };
        v
    }),
    row!("mov-to-dr", 3, true, true, || {
        unsafe { asm!("mov dr7, rax", in("rax") 0x400u64, options(nostack)) };
        0
    }),
    row!("lgdt", 3, true, true, || {
        unsafe { asm!("lgdt [rdi]", in("rdi") addr_of!(SAVED.gdtr), options(nostack)) };
        0
    }),
    row!("lidt", 3, true, true, || {
        unsafe { asm!("lidt [rdi]", in("rdi") addr_of!(SAVED.idtr), options(nostack)) };
        0
    }),
    row!("lldt", 3, true, true, || {
        unsafe { asm!("lldt ax", in("ax") 0u16, options(nostack)) };
        0
    }),
    row!("clts", 2, true, true, || {
        unsafe { asm!("clts", options(nostack)) };
        0
    }),
    row!("invlpg", 3, true, true, || {
        unsafe { asm!("invlpg [rdi]", in("rdi") buf(), options(nostack)) };
        0
    }),
    row!("wbinvd", 2, true, true, || {
        unsafe { asm!("wbinvd", options(nostack)) };
        0
    }),
    row!("rdmsr", 2, true, true, || {
        let (lo, hi): (u32, u32);
        unsafe { asm!("rdmsr", in("ecx") 0x5050_0000u32, out("eax") lo, out("edx") hi, options(nostack)) };
        u64::from(hi) << 32 | u64::from(lo)
    }),
    row!("wrmsr", 2, true, true, || {
        unsafe { asm!("wrmsr", in("ecx") 0x5050_0002u32, in("eax") 1u32, in("edx") 0u32, options(nostack)) };
        0
    }),
    row!("swapgs", 3, true, true, || {
        unsafe { asm!("swapgs", options(nostack)) };
        0
    }),
];

fn exit_count() -> u64 {
    call(hc::EXIT_COUNT, [0; 4]) as u64
}

fn measure(row: &Row) -> Cell {
    let mut value = 0;
    let before = exit_count();
    let vector = catch(row.skip, || value = (row.run)());
    // The second EXIT_COUNT is itself one exit.
    let exits = exit_count().saturating_sub(before + 1);
    match vector {
        Some(vector) => Cell::Trapped { vector, exits },
        None => Cell::Ran { value, exits },
    }
}

/// Rows the command line asks to leave out of ring 0 (`ring0-skip=lar,lsl`): on hosts
/// whose ring 0 is an instruction emulator (PVM), an instruction it does not implement
/// ends the VM with an emulation failure instead of running or trapping.
static mut RING0_SKIP: &[u8] = &[];
/// Rows left out of the ring-3 phases (`ring3-skip=`), for the same reason on other hosts.
static mut RING3_SKIP: &[u8] = &[];

fn listed(list: &[u8], name: &str) -> bool {
    list.split(|&b| b == b',').any(|item| item == name.as_bytes())
}

fn skipped(phase: usize, name: &str) -> bool {
    // SAFETY: set once before phase 0.
    let list = unsafe {
        if phase == 0 {
            *addr_of!(RING0_SKIP)
        } else {
            *addr_of!(RING3_SKIP)
        }
    };
    listed(list, name)
}

fn run_phase(phase: usize) {
    for (i, row) in TABLE.iter().enumerate() {
        if (phase == 0 && !row.ring0) || skipped(phase, row.name) {
            continue;
        }
        let cell = measure(row);
        // SAFETY: only the running phase writes its column.
        unsafe { (*addr_of_mut!(RESULTS))[i][phase] = cell };
        if phase == 0 {
            undo_in_ring0(row.name);
        }
    }
}

/// Puts back what a row changed in ring 0 (interrupts, GS base).
fn undo_in_ring0(name: &str) {
    // SAFETY: ring 0; restores the state the kernel runs with.
    unsafe {
        match name {
            "popf" | "sti" => asm!("cli", options(nostack)),
            "swapgs" => asm!("swapgs", options(nostack)),
            _ => {}
        }
    }
}

fn umip_supported() -> bool {
    let leaf7 = core::arch::x86_64::__cpuid_count(7, 0);
    leaf7.ecx & (1 << 2) != 0
}

/// Ring 0: saves descriptor tables and CR0 for the rows that reload them, runs phase 0,
/// then enters ring 3 for phases 1 and 2.
pub fn trap_suite(context: &Context) -> u8 {
    // SAFETY: ring 0, single CPU; fills the statics ring 3 later reads.
    unsafe {
        *addr_of_mut!(RING0_SKIP) = crate::start_info::arg(context.cmdline, "ring0-skip").unwrap_or(&[]);
        *addr_of_mut!(RING3_SKIP) = crate::start_info::arg(context.cmdline, "ring3-skip").unwrap_or(&[]);
        let saved = &mut *addr_of_mut!(SAVED);
        asm!("sgdt [rdi]", in("rdi") saved.gdtr.as_mut_ptr(), options(nostack));
        asm!("sidt [rdi]", in("rdi") saved.idtr.as_mut_ptr(), options(nostack));
        asm!("mov {}, cr0", out(reg) saved.cr0, options(nostack));
        *addr_of_mut!(UMIP) = umip_supported();
    }
    run_phase(0);
    cpu::enter_user(ring3)
}

/// Called by the trap handler for an `int3` with PHASE_SWITCH set: CR4.TSD, and UMIP when
/// the CPU has it.
pub fn enable_phase2() {
    const CR4_TSD: u64 = 1 << 2;
    const CR4_UMIP: u64 = 1 << 11;
    // SAFETY: ring 0 (called from the trap handler); only adds the two CR4 bits.
    unsafe {
        let mut cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4, options(nostack));
        cr4 |= CR4_TSD;
        if *addr_of!(UMIP) {
            cr4 |= CR4_UMIP;
        }
        asm!("mov cr4, {}", in(reg) cr4, options(nostack));
    }
}

extern "C" fn ring3() -> ! {
    run_phase(1);
    // SAFETY: read by the trap handler on the int3 below.
    unsafe {
        *addr_of_mut!(PHASE_SWITCH) = true;
        asm!("int3", options(nostack));
    }
    run_phase(2);
    print_table();
    exit(SUCCESS)
}

/// What ring 0 sees architecturally, for rows a host could not run in ring 0: LAR, LSL,
/// VERR and VERW on the kernel's own DPL-0 selectors set ZF at CPL 0.
fn ring0_baseline(name: &str) -> Option<u64> {
    matches!(name, "lar" | "lsl" | "verr" | "verw").then_some(1)
}

fn print_cell(cell: Cell, ring0: Cell, row: &Row) {
    let exited = |exits: u64| if exits > 0 { "+exit" } else { "" };
    let baseline = match ring0 {
        Cell::Ran { value, .. } => Some(value),
        _ => ring0_baseline(row.name),
    };
    match cell {
        Cell::NotRun => print!(" -"),
        Cell::Ran { value, exits } => {
            let differs = row.compare && baseline.is_some_and(|v0| v0 != value);
            print!(" {}{}", if differs { "differs" } else { "ok" }, exited(exits));
        }
        Cell::Trapped { vector, exits } => print!(" {}{}", vector_name(vector), exited(exits)),
    }
}

fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        3 => "#BP",
        6 => "#UD",
        13 => "#GP",
        14 => "#PF",
        _ => "#other",
    }
}

fn print_table() {
    // SAFETY: read-only at the end.
    let umip = unsafe { *addr_of!(UMIP) };
    println!("trap-suite umip={} columns=ring0,ring3,ring3-tsd-umip", if umip { "yes" } else { "no" });
    for (i, row) in TABLE.iter().enumerate() {
        // SAFETY: all phases are done.
        let cells = unsafe { (*addr_of!(RESULTS))[i] };
        print!("trap {}", row.name);
        for cell in cells {
            print_cell(cell, cells[0], row);
        }
        println!();
    }
    println!("trap-suite done");
}
